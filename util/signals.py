"""A run stops cleanly on SIGINT, SIGTERM or SIGUSR1: the signal only asks, the training loop
answers at the end of its step (see ``StopSignal``)."""
from __future__ import annotations

import os
import signal
import threading
import time

from util.logging_utils import get_logger

# Ctrl-C; a scheduler's pre-emption or time limit (SLURM, Kubernetes); the advance notice that
# SLURM's --signal=USR1@<seconds> sends before the time limit.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class LoaderWorkerSignals:
    """The data loaders' ``worker_init_fn``: a loading worker leaves the stop signals to the
    training process it loads for. A cluster signals every process of a job (SLURM at
    pre-emption, ``scancel --signal``), and a loading worker that died of it would fail the
    training step before the state is saved. SIGTERM from the training process itself (the
    loader ending its workers, also at exit) still ends the worker at once."""

    def __init__(self):
        self.owner = os.getpid()  # made in the training process, called in each of its workers

    def __call__(self, worker_id: int) -> None:
        for sig in (signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        # Who sent a SIGTERM is known only to a thread that waits for it, with it blocked.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=self._end_on_owners_sigterm, name="sigterm", daemon=True).start()

    def _end_on_owners_sigterm(self) -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != self.owner:
            pass  # the cluster's: the training process answers it, and ends this worker
        os._exit(0)


def under_torchrun() -> bool:
    """Whether this process is a worker that torchrun started (it sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopSignal:
    """SIGINT, SIGTERM or SIGUSR1 ask the run to finish its training step (or abandon its
    evaluation), save its state and exit cleanly; a second request exits at once.

    One request can arrive twice, and the copy must not count as a second request, which
    would exit without saving: torchrun passes one Ctrl-C on to its workers as SIGINT and
    then, about 1 ms later, SIGTERM; and a cluster that signals every process of a job (SLURM
    at pre-emption, ``scancel --signal``) reaches a torchrun worker directly and again through
    torchrun, which passes the same signal on. So a second signal within ``window`` seconds of
    the first is the same request (once): one of the other signals, or, in a process that
    torchrun started (``copies``, by default), the same one too. The same signal again outside
    torchrun, a third signal, or any signal later is a second request."""

    def __init__(self, window: float = 2.0, copies: bool | None = None):
        self.requested = False
        self.window = window
        self.copies = under_torchrun() if copies is None else copies
        self._first: tuple[int, float] | None = None  # the signal that asked, and when
        self._twin_seen = False
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in STOP_SIGNALS:
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
        return (signum != first or self.copies) and time.monotonic() - at < self.window

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
