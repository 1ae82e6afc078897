"""Run folders: ``<exp_root>/<dataset>/<exp_name>-<timestamp>/``, which one a run writes to or
resumes, where stage 2 finds the stage-1 checkpoint, and the stop request of a run."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

import config
from util.checkpoint import CheckpointError, remove_stale_temporaries
from util.dist import DistInfo, barrier, broadcast_object
from util.logging_utils import (RunLogger, environment_info, get_logger, save_json, setup_logging,
                                truncate_logs)

if TYPE_CHECKING:
    from util.resume import Resume


def experiment_dir(args: Namespace) -> Path:
    return config.output_root(args.exp_root) / args.dataset_name


def latest_run(args: Namespace, *needs: str) -> Path | None:
    """Newest run folder of ``--exp_name`` (not of a longer name that starts with it) that
    holds one of the files ``needs``."""
    pattern = re.compile(re.escape(args.exp_name) + r"-\d{8}-\d{6}-\d{6}")
    runs = sorted(r for r in experiment_dir(args).glob(f"{args.exp_name}-*") if pattern.fullmatch(r.name))
    found = [r for r in runs if any((r / name).is_file() for name in needs)]
    return found[-1] if found else None


def new_run_dir(args: Namespace, info: DistInfo) -> Path:
    """A new timestamped folder's path (the same on every process); nothing is created."""
    stamp = broadcast_object(datetime.now().strftime("%Y%m%d-%H%M%S-%f"), info)
    return experiment_dir(args) / f"{args.exp_name}-{stamp}"


def tes_checkpoint_path(args: Namespace, run_dir: Path | None = None) -> Path | None:
    """Stage-1 checkpoint for ``--stage get``: the flag's, this run's, or the newest run's
    (None when there is none)."""
    if args.tes_checkpoint:
        return Path(args.tes_checkpoint)
    if run_dir is not None and (run_dir / "tes.pt").is_file():
        return run_dir / "tes.pt"
    found = latest_run(args, "tes.pt")
    return found / "tes.pt" if found else None


def find_tes_checkpoint(args: Namespace, run_dir: Path) -> Path:
    """``tes_checkpoint_path``, or an error saying how to make one."""
    path = tes_checkpoint_path(args, run_dir)
    if path is None:
        raise CheckpointError(
            f"--stage get needs a stage-1 checkpoint: none found for --exp_name {args.exp_name} "
            f"under {experiment_dir(args)}. Run --stage tes (or --stage all) first, or pass "
            "--tes_checkpoint PATH.")
    return path


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
def open_run(args: Namespace, info: DistInfo, run_dir: Path, resume: Resume | None) -> Iterator[Run]:
    """The run, once every input is valid: its folder created (or the resumed one locked and
    cut back to the resume point), its log file, TensorBoard writer and SIGINT/SIGTERM
    handler; a failure is logged to ``log.txt`` before it propagates."""
    log = get_logger()
    with RunLock(run_dir, info) as lock, StopSignal() as stop:
        setup_logging(run_dir / "log.txt", info.is_main).info("run folder: %s", run_dir)
        if lock.taken_over:
            log.warning("took over the lock of process %s, which is no longer running", lock.taken_over)
        if info.is_main:
            record_start(args, run_dir, resume)
        barrier()
        run = Run(args, info, run_dir, RunLogger(run_dir, enabled=info.is_main), stop)
        try:
            yield run
        except BaseException as err:
            log.error("run stopped: %s: %s", type(err).__name__, err)
            raise
        finally:
            run.logger.close()


def record_start(args: Namespace, run_dir: Path, resume: Resume | None) -> None:
    """A new run writes its flags and environment; a resume keeps them, cuts the logs back to
    its checkpoint and appends what it changed to ``resumes.jsonl``."""
    for stale in remove_stale_temporaries(run_dir):
        get_logger().info("removed %s, left by an interrupted checkpoint write", stale.name)
    environment = environment_info(Path(__file__).resolve().parents[1])
    if resume is None:
        if args.resume == "auto":
            get_logger().warning("--resume auto: no run of --exp_name %s under %s to resume; "
                                 "this is a new run", args.exp_name, experiment_dir(args))
        save_json(vars(args), run_dir / "config.json")
        save_json(environment, run_dir / "environment.json")
        return
    loop = resume.checkpoint["loop"]
    truncate_logs(run_dir, resume.stage, loop["epoch"], loop["global_step"])
    get_logger().info("resuming stage %s from %s at epoch %d, step %d%s", resume.stage, resume.path,
                      loop["epoch"], loop["step_in_epoch"],
                      "".join(f"; --{k} {old} -> {new}" for k, (old, new) in resume.changed.items()))
    record = {"time": datetime.now().isoformat(timespec="seconds"), "from": str(resume.path),
              "stage": resume.stage, "epoch": loop["epoch"], "step_in_epoch": loop["step_in_epoch"],
              "changed": resume.changed, "environment": environment}
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


class RunLockedError(RuntimeError):
    """Another live process is writing to this run folder."""


class RunLock:
    """``run.lock`` in the run folder, held by the main process while it runs: a second
    process is refused, naming the holder; a lock whose process is dead is taken over."""

    def __init__(self, run_dir: Path, info: DistInfo):
        self.path, self.held = run_dir / "run.lock", info.is_main
        self.taken_over = None  # the pid of a dead holder whose lock was taken over

    def __enter__(self) -> RunLock:
        if self.held:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while not self._create():
                self._refuse_or_clear()
        barrier()
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return True

    def _refuse_or_clear(self) -> None:
        pid, host = (self.path.read_text().split() + ["0", ""])[:2]
        if host == socket.gethostname() and not _alive(int(pid)):
            self.taken_over = pid
            self.path.unlink(missing_ok=True)
            return
        raise RunLockedError(f"{self.path.parent} is in use by process {pid} on {host} (lock file "
                             f"{self.path}); wait for it to finish, or start a new run with another "
                             "--exp_name. If that process is gone, delete the lock file.")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True
