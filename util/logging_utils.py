"""Run folder, console/file logging, TensorBoard and ``metrics.jsonl``.

Every scalar goes through :meth:`RunLogger.log_scalars`, which writes the same names to
TensorBoard and to one JSON line, so a new loss term is logged by adding it to the loss's
component dict and nowhere else. Only the main process writes anything.
"""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping

import torch
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from util.checkpoint import LAST_CHECKPOINT

LOGGER_NAME = "get"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(log_file: Path | None, is_main: bool = True) -> logging.Logger:
    """Console logging for the main process, mirrored into ``log_file`` when given."""
    logger = get_logger()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def environment_info(repo_dir: Path) -> dict:
    """Git commit, dirty flag and library versions: what it takes to reproduce a run."""
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "open_clip", "numpy", "scipy", "sklearn"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            info[name] = "missing"
    info["git_commit"] = _git(repo_dir, "rev-parse", "HEAD")
    status = _git(repo_dir, "status", "--porcelain")
    info["git_dirty"] = None if status is None else bool(status)
    return info


def _git(repo_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


class RunLogger:
    """TensorBoard + ``metrics.jsonl`` writer; a no-op on non-main processes."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self._jsonl = run_dir / "metrics.jsonl"

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Write each ``tag: value`` to TensorBoard at ``step``."""
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, float(value), step)

    def log_epoch(self, record: Mapping[str, object]) -> None:
        """Append one JSON line (an epoch's summary) to ``metrics.jsonl``."""
        if not self.enabled:
            return
        with open(self._jsonl, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def save_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


STAGES = tuple(LAST_CHECKPOINT)  # in run order


def keeps(stage: str, epoch: int, global_step: int) -> Callable[[str, int], bool]:
    """Whether a logged scalar (tag, step) lies before a resume point of ``stage`` at
    (``epoch`` completed epochs, ``global_step`` steps): per-step tags ``<stage>/loss/*``
    count steps, every other tag of the stage (and ``eval/*`` of stage 2) counts epochs."""
    later = STAGES[STAGES.index(stage) + 1:]

    def keep(tag: str, step: int) -> bool:
        owner = "get" if tag.startswith("eval/") else tag.split("/", 1)[0]
        if owner in later:
            return False
        if owner != stage:
            return True
        return step <= global_step if tag.startswith(f"{stage}/loss/") else step < epoch

    return keep


def truncate_logs(run_dir: Path, stage: str, epoch: int, global_step: int) -> None:
    """Cut ``metrics.jsonl`` and the TensorBoard events back to a resume point, so that a
    resumed run logs each epoch and step once."""
    keep = keeps(stage, epoch, global_step)
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.is_file():
        lines = jsonl.read_text().splitlines()
        kept = [line for line, r in zip(lines, map(json.loads, lines)) if keep(f"{r['stage']}/", r["epoch"])]
        jsonl.write_text("".join(line + "\n" for line in kept))
    old_files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    if not old_files:
        return
    tmp_dir = run_dir / "tensorboard" / "kept"
    writer = EventFileWriter(str(tmp_dir))
    for path in old_files:
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            values = [v for v in event.summary.value if keep(v.tag, event.step)]
            if values:
                del event.summary.value[:]
                event.summary.value.extend(values)
                writer.add_event(event)
    writer.close()
    (kept,) = tmp_dir.iterdir()
    for path in old_files:
        path.unlink()
    # The name of the first old file: TensorBoard reads files in name order, and these
    # events come before those of the resumed run.
    kept.rename(old_files[0])
    tmp_dir.rmdir()
