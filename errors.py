"""The errors a user can fix. Each message says what was expected and how to fix it (which flag,
which path), so ``train.py``, ``predict.py``, ``estimate_k.py`` and ``report.py`` print it alone,
without a traceback: they catch ``USER_ERRORS``."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another experiment set-up."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset root is missing, incomplete or not laid out as expected."""


class ImageLoadError(OSError):
    """An image file of a dataset is missing or cannot be decoded."""


class ImageCacheError(OSError):
    """The image cache cannot be built (no room on its disk, a folder that cannot be written, a
    build stopped by SIGINT/SIGTERM); the message names the flag."""


class NonFiniteLossError(RuntimeError):
    """A training step gave a non-finite loss; the message names the step and every term."""


class RunLockedError(RuntimeError):
    """Another live process is writing to this run folder."""


class InputError(ValueError):
    """A flag's value or an input file that cannot be used; the message names it."""


USER_ERRORS = (CheckpointError, FileNotFoundError, ImageCacheError, ImageLoadError, InputError,
               NonFiniteLossError, RunLockedError)
