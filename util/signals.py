"""A run stops cleanly on SIGINT/SIGTERM: the signal only asks, the training loop answers at
the end of its step (see ``StopSignal``)."""
from __future__ import annotations

import signal
import time

from util.logging_utils import get_logger


class StopSignal:
    """SIGINT/SIGTERM ask the run to finish its training step (or abandon its evaluation),
    save its state and exit cleanly; a second request exits at once.

    torchrun passes one Ctrl-C on to its workers as SIGINT and then, about 1 ms later, SIGTERM,
    which a worker would take for a second request and exit without saving. So the other one of
    the two signals, within ``window`` seconds of the first, is the same request (once); the same
    signal again, or any signal later, is a second request."""

    def __init__(self, window: float = 2.0):
        self.requested = False
        self.window = window
        self._first: tuple[int, float] | None = None  # the signal that asked, and when
        self._twin_seen = False
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self._is_twin(signum):
            self._twin_seen = True
            get_logger().info("received signal %d just after signal %d: the same stop request",
                              signum, self._first[0])
            return
        if self.requested:  # a second request: exit now (a checkpoint being written is dropped)
            raise SystemExit(128 + signum)
        self.requested = True
        self._first = (signum, time.monotonic())
        get_logger().warning("received signal %d: stopping after the current step (a second "
                             "signal exits at once)", signum)

    def _is_twin(self, signum: int) -> bool:
        if self._first is None or self._twin_seen:
            return False
        first, at = self._first
        return signum != first and time.monotonic() - at < self.window

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
