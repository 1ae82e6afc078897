"""Run folders: ``<exp_root>/<dataset>/<exp_name>-<timestamp>/``, which one a run writes to or
resumes, where stage 2 finds the stage-1 checkpoint, and what a run holds while it runs
(``Run``: its flags, processes, folder, logs and stop request).

A run folder holds the checkpoints (runs/checkpoints.py) and the files named below.
"""
from __future__ import annotations

import json
import os
import re
import socket
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

import config
from engine import Loop
from errors import CheckpointError, RunLockedError
from runs.checkpoints import TES_FILE
from runs.logs import truncate_logs
from util.dist import DistInfo, any_rank, barrier, broadcast_object
from util.io import remove_stale_temporaries, save_json
from util.logging_utils import RunLogger, environment_info, get_logger, setup_logging
from util.signals import StopSignal

if TYPE_CHECKING:
    from runs.resume import Resume

# The files of a run folder besides its checkpoints.
# (And those of its logger: util.logging_utils.METRICS_FILE and TENSORBOARD_DIR.)
CONFIG, ENVIRONMENT, LOG = "config.json", "environment.json", "log.txt"
FINAL_METRICS, EVAL_METRICS = "final_metrics.json", "eval_metrics.json"
K_ESTIMATE, CLUSTER_SIZES, SKIPPED_IMAGES = "k_estimate.json", "cluster_sizes.json", "skipped_images.txt"
RESUMES, LOCK = "resumes.jsonl", "run.lock"
# The final evaluation's confusion matrices, runs with ground truth only (views/confusion.py):
# CONFUSION_DIR/<split>_<head>.json (the counts, which report.py redraws) and .png (the heat map).
CONFUSION_DIR = "confusion"


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
    if run_dir is not None and (run_dir / TES_FILE).is_file():
        return run_dir / TES_FILE
    found = latest_run(args, TES_FILE)
    return found / TES_FILE if found else None


def find_tes_checkpoint(args: Namespace, run_dir: Path | None = None) -> Path:
    """``tes_checkpoint_path``, or an error saying how to make one."""
    path = tes_checkpoint_path(args, run_dir)
    if path is None:
        raise CheckpointError(
            f"--stage get needs a stage-1 checkpoint: none found for --exp_name {args.exp_name} "
            f"under {experiment_dir(args)}. Run --stage tes (or --stage all) first, or pass "
            "--tes_checkpoint PATH.")
    return path


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
        """This process's device (under torchrun, CUDA means the GPU of its local rank)."""
        return torch.device(self.info.device(self.args.device))

    def stop_requested(self) -> bool:
        """Whether any process was asked to stop (a collective: every process must ask)."""
        return any_rank(self.stop.requested, device=self.device)[0]

    def loop(self) -> Loop:
        """What the training loop needs of the run."""
        return Loop(self.device, self.info, self.logger, self.stop, self.args.log_every,
                    self.args.max_steps_per_epoch, self.args.progress)


@contextmanager
def open_run(args: Namespace, info: DistInfo, run_dir: Path, resume: Resume | None,
             task_record: dict | None = None) -> Iterator[Run]:
    """The run, once every input is valid: its folder created (or the resumed one locked and
    cut back to the resume point), its log file, TensorBoard writer and SIGINT/SIGTERM
    handler; a failure is logged to ``log.txt`` before it propagates."""
    log = get_logger()
    with RunLock(run_dir, info) as lock, StopSignal() as stop:
        setup_logging(run_dir / LOG, info.is_main).info("run folder: %s", run_dir)
        if lock.taken_over:
            log.warning("took over the lock of process %s, which is no longer running", lock.taken_over)
        if info.is_main:
            record_start(args, run_dir, resume, task_record or {})
        barrier()
        run = Run(args, info, run_dir, RunLogger(run_dir, enabled=info.is_main), stop)
        try:
            yield run
        except BaseException as err:
            log.error("run stopped: %s: %s", type(err).__name__, err)
            raise
        finally:
            run.logger.close()


def record_start(args: Namespace, run_dir: Path, resume: Resume | None, task_record: dict) -> None:
    """A new run writes its flags with its task's class split (``Task.record``) and its
    environment; a resume keeps them, cuts the logs back to its checkpoint and appends what it
    changed to ``resumes.jsonl``."""
    for stale in remove_stale_temporaries(run_dir):
        get_logger().info("removed %s, left by an interrupted checkpoint write", stale.name)
    environment = environment_info(Path(__file__).resolve().parents[1])
    if resume is None:
        if args.resume == "auto":
            get_logger().warning("--resume auto: no run of --exp_name %s under %s to resume; "
                                 "this is a new run", args.exp_name, experiment_dir(args))
        save_json({**vars(args), **task_record}, run_dir / CONFIG)
        save_json(environment, run_dir / ENVIRONMENT)
        return
    if not (run_dir / CONFIG).is_file():
        # A checkpoint copied alone into a folder: without config.json the run would be
        # invisible to report.py. This resume's flags agree with the saved run's on every flag
        # that defines it (runs.resume.find_resume).
        get_logger().info("%s has no %s: written from this resume's flags", run_dir, CONFIG)
        save_json({**vars(args), **task_record}, run_dir / CONFIG)
    if not (run_dir / ENVIRONMENT).is_file():
        save_json(environment, run_dir / ENVIRONMENT)
    loop = resume.checkpoint["loop"]
    truncate_logs(run_dir, resume.stage, loop["epoch"], loop["global_step"])
    get_logger().info("resuming stage %s from %s at epoch %d, step %d%s", resume.stage, resume.path,
                      loop["epoch"], loop["step_in_epoch"],
                      "".join(f"; --{k} {old} -> {new}" for k, (old, new) in resume.changed.items()))
    record = {"time": datetime.now().isoformat(timespec="seconds"), "from": str(resume.path),
              "stage": resume.stage, "epoch": loop["epoch"], "step_in_epoch": loop["step_in_epoch"],
              "changed": resume.changed, "environment": environment}
    with open(run_dir / RESUMES, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


class RunLock:
    """``run.lock`` in the run folder, held by the main process while it runs: a second
    process is refused, naming the holder; a lock whose process is dead is taken over."""

    def __init__(self, run_dir: Path, info: DistInfo):
        self.path, self.held = run_dir / LOCK, info.is_main
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
