"""Console/file logging, TensorBoard and ``metrics.jsonl``, and what a run records of its
environment.

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
from typing import Mapping

import torch

LOGGER_NAME = "get"
# What RunLogger writes in its folder.
METRICS_FILE, TENSORBOARD_DIR = "metrics.jsonl", "tensorboard"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def printable(text: str) -> str:
    """``text`` with the bytes of names that are not UTF-8 (which Python holds as surrogate
    escapes) written as ``\\xNN``, so that any UTF-8 stream can take it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class PrintableFormatter(logging.Formatter):
    """Log lines through ``printable``: a path that is not UTF-8 would otherwise make the
    handler print "--- Logging error ---" instead of the line."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def setup_logging(log_file: Path | None, is_main: bool = True) -> logging.Logger:
    """Console logging for the main process, mirrored into ``log_file`` when given."""
    logger = get_logger()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    fmt = PrintableFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
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

            self._tb = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
            self._jsonl = run_dir / METRICS_FILE

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Write each ``tag: value`` to TensorBoard at ``step``."""
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, float(value), step)

    def set_layout(self, layout: Mapping[str, Mapping[str, list]]) -> None:
        """TensorBoard's Custom Scalars page: {category: {chart: ["Multiline", [tags]]}}, in order."""
        if self.enabled:
            self._tb.add_custom_scalars(dict(layout))

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
