"""A run stops cleanly on SIGINT/SIGTERM: the signal only asks, the training loop answers at
the end of its step (see ``StopSignal``)."""
from __future__ import annotations

import signal

from util.logging_utils import get_logger


class StopSignal:
    """SIGINT/SIGTERM ask the run to finish its training step (or abandon its evaluation),
    save its state and exit cleanly; a second one exits at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: exit now (a checkpoint being written is dropped)
            raise SystemExit(128 + signum)
        self.requested = True
        get_logger().warning("received signal %d: stopping after the current step (a second "
                             "signal exits at once)", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
