"""Run folders: ``<exp_root>/<dataset>/<exp_name>-<timestamp>/``, which one a run writes to or
resumes, where stage 2 finds the stage-1 checkpoint, and the stop request of a run."""
from __future__ import annotations

import re
import signal
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import torch

import config
from util.checkpoint import CheckpointError
from util.dist import DistInfo, barrier, broadcast_object
from util.logging_utils import RunLogger, get_logger, setup_logging


def experiment_dir(args: Namespace) -> Path:
    return config.output_root(args.exp_root) / args.dataset_name


def latest_run(args: Namespace, *needs: str) -> Path | None:
    """Newest run folder of ``--exp_name`` (not of a longer name that starts with it) that
    holds one of the files ``needs``."""
    pattern = re.compile(re.escape(args.exp_name) + r"-\d{8}-\d{6}-\d{6}")
    runs = sorted(r for r in experiment_dir(args).glob(f"{args.exp_name}-*") if pattern.fullmatch(r.name))
    found = [r for r in runs if any((r / name).is_file() for name in needs)]
    return found[-1] if found else None


def make_run_dir(args: Namespace, info: DistInfo) -> Path:
    """The folder of the run being resumed, or a new timestamped one; exists on return."""
    run_dir = resumed_run_dir(args)
    if run_dir is None:
        stamp = broadcast_object(datetime.now().strftime("%Y%m%d-%H%M%S-%f"), info)
        run_dir = experiment_dir(args) / f"{args.exp_name}-{stamp}"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()  # the folder exists before any process writes into it
    return run_dir


def resumed_run_dir(args: Namespace) -> Path | None:
    """The folder ``--resume`` points at; None for a fresh run (``auto`` with nothing to resume
    becomes one, and ``args.resume`` is cleared so the log says so)."""
    if args.resume == "auto":
        run = latest_run(args, "last.pt", "tes_last.pt")
        if run is None:
            args.resume = None
        return run
    if args.resume:
        path = Path(args.resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint file (expected a last.pt "
                                  "or tes_last.pt written by train.py, or 'auto')")
        return path.parent
    return None


def find_tes_checkpoint(args: Namespace, run_dir: Path) -> Path:
    """Stage-1 checkpoint for ``--stage get``: the flag's, this run's, or the newest run's."""
    if args.tes_checkpoint:
        return Path(args.tes_checkpoint)
    if (run_dir / "tes.pt").is_file():
        return run_dir / "tes.pt"
    found = latest_run(args, "tes.pt")
    if found is None:
        raise CheckpointError(
            f"--stage get needs a stage-1 checkpoint: none found for --exp_name {args.exp_name} "
            f"under {experiment_dir(args)}. Run --stage tes (or --stage all) first, or pass "
            "--tes_checkpoint PATH.")
    return found / "tes.pt"


class StopSignal:
    """SIGINT/SIGTERM ask the loop to finish its step, save ``last.pt`` and exit cleanly."""

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
        self.requested = True
        get_logger().warning("received signal %d: stopping after the current step", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """What every part of a run shares: the flags, the processes, the folder and its logs."""
    args: Namespace
    info: DistInfo
    dir: Path
    logger: RunLogger
    stop: StopSignal

    @property
    def device(self) -> torch.device:
        return torch.device(self.args.device)


@contextmanager
def start_run(args: Namespace, info: DistInfo) -> Iterator[Run]:
    """The run: its folder (new, or the one resumed), its log file, TensorBoard writer and
    SIGINT/SIGTERM handler, all closed again when it ends."""
    run_dir = make_run_dir(args, info)
    setup_logging(run_dir / "log.txt", info.is_main).info("run folder: %s", run_dir)
    with StopSignal() as stop:
        run = Run(args, info, run_dir, RunLogger(run_dir, enabled=info.is_main), stop)
        try:
            yield run
        finally:
            run.logger.close()
