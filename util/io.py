"""Files that survive a kill and never run code: atomic writes, safe checkpoint loads, JSON.

Every checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(weights_only=True)`` and never executes pickled code. Writes go to a
temporary file in the same folder and are renamed into place, so a run killed at any moment
leaves either the previous complete file or the new complete one, never a torn file. (What a
run's checkpoints hold: runs/checkpoints.py.)

``unreadable_reason`` words a failed load without PyTorch's advice to retry with
``weights_only=False``, which would run any code the file carries. (TorchScript archives, which
``torch.load`` cannot read safely: util/torchscript.py.)
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import torch

from errors import CheckpointError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """``path`` opened for writing at a temporary name in its folder (``open_kwargs`` as
    ``open``'s) and renamed into place once the block completes, with the mode of any new file
    (the umask's); on any failure, ``path`` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: others could not read it
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save`` of ``obj`` through ``atomic_file``: a failed write leaves ``path`` as it was."""
    try:
        with atomic_file(path) as f:
            torch.save(obj, f)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise CheckpointError(f"no space left on the disk of {path} while saving it; the "
                                  "previous version of the file is intact. Free some space and "
                                  "resume with --resume auto") from err
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that killed ``atomic_save`` calls left in ``folder``."""
    stale = sorted(folder.glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, expect: Mapping[str, Any] | None = None) -> dict:
    """Load a checkpoint safely and check that it matches the current set-up.

    ``expect`` maps keys of the checkpoint's ``meta`` dict (e.g. dataset, number of classes,
    CLIP architecture) to the values this run needs; any difference is refused with a message
    naming the key, both values and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f"could not read checkpoint {path} ({unreadable_reason(err)}). It may be truncated "
            "or damaged, or not a checkpoint of this project: expected a file written by this "
            "project's train.py (tes.pt, last.pt or best.pt). A file that carries code or other "
            "objects is refused, because loading it could run that code. Point the flag at "
            "another file."
        ) from err
    meta = ckpt.get("meta", {}) if isinstance(ckpt, dict) else {}
    for key, want in (expect or {}).items():
        have = meta.get(key)
        if have != want:
            raise CheckpointError(
                f"checkpoint {path} was made for {key}={have!r}, but this run has {key}={want!r}. "
                "Use a checkpoint of the same dataset, class split and CLIP model."
            )
    return ckpt


def unreadable_reason(err: BaseException) -> str:
    """Why a file could not be read, for an error message: ``err`` as it is, except that
    PyTorch's refusals under ``weights_only=True`` are summarised, because their text advises
    retrying with ``weights_only=False``, which would run any code the file carries."""
    text = str(err)
    if "weights_only" in text or "WeightsUnpickler" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)  # what the weights-only reader refused
        named = f", such as {found.group(1)}," if found else ""
        return ("it holds something other than tensors, numbers, strings, lists and dicts"
                f"{named} or it is damaged")
    if isinstance(err, EOFError):
        return "it ends before its content does"
    if len(text) > 800:
        text = text[:800] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def unwritable_parent(path: Path) -> str | None:
    """Why nothing can be created at ``path`` (its nearest existing ancestor is a file, or a
    folder this process may not write in); None if something can."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"no permission to write in {parent}"
            return None
    return None


def save_json(obj: object, path: Path) -> None:
    """``obj`` as indented JSON (keys sorted; anything else JSON lacks as its str)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

