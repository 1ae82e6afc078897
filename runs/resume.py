"""What ``--resume`` continues: one checkpoint file, read and validated before anything is
trained or written, and the flags that may differ from the run it continues."""
from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from errors import CheckpointError
from runs.checkpoints import LAST_FILE, progress
from runs.run import latest_run
from util.io import load_checkpoint

# Where things are and how this machine runs them: these may change when a run is resumed.
# Every other flag defines the run (its data, model, schedule, seed) and must stay as saved.
CHANGEABLE_ON_RESUME = ("resume", "stage", "device", "amp", "compile", "num_workers", "progress",
                        "log_every", "eval_every", "test_every", "eval_cache_gb", "exp_root",
                        "exp_name", "data_root", "download", "clip_cache_dir", "pretrained",
                        "skip_bad_images", "image_cache", "tes_checkpoint", "eval_checkpoint")


@dataclass
class Resume:
    path: Path
    checkpoint: dict          # a full training state of stage checkpoint["stage"]
    changed: dict             # {flag: [saved value, new value]} for the allowed changes

    @property
    def stage(self) -> str:
        return self.checkpoint["stage"]

    @property
    def run_dir(self) -> Path:
        return self.path.parent


def find_resume(args: Namespace, meta: dict, flags: list[str]) -> Resume | None:
    """The validated checkpoint that ``--resume`` names (None for a new run).

    ``meta`` is what the checkpoint must agree on (dataset, classes, CLIP model); ``flags``
    are the names of every flag. Raises CheckpointError for a missing, unreadable, foreign or
    non-training file, for a file whose run folder holds later work that resuming from it
    would overwrite, and for flags that differ from the run's and may not.
    """
    path = resume_path(args)
    if path is None:
        return None
    checkpoint = load_checkpoint(path, expect=meta)
    if checkpoint.get("stage") not in LAST_FILE or "loop" not in checkpoint:
        raise CheckpointError(f"--resume {path}: not a training checkpoint of train.py (expected "
                              "the last.pt, best.pt or tes_last.pt of a run)")
    refuse_overwriting_later_work(path, checkpoint)
    changed = changed_flags(checkpoint.get("args", {}), args, flags)
    fixed = {k: v for k, v in changed.items() if k not in CHANGEABLE_ON_RESUME}
    if fixed:
        listed = ", ".join(f"--{k} {saved} -> {new}" for k, (saved, new) in fixed.items())
        raise CheckpointError(
            f"--resume {path}: these flags differ from the run being resumed (saved -> given): "
            f"{listed}. They define the run: resume with the saved values, or start a new run "
            f"(another --exp_name). Flags that may change on resume: "
            + ", ".join(f"--{k}" for k in CHANGEABLE_ON_RESUME))
    return Resume(path, checkpoint, changed)


def resume_path(args: Namespace) -> Path | None:
    """The file ``--resume`` means: PATH itself, or the latest state of the newest run of
    ``--exp_name`` for ``auto`` (None when there is none)."""
    if args.resume == "auto":
        run = latest_run(args, *LAST_FILE.values())
        if run is None:  # the run folder's log says so (runs.run.record_start)
            return None
        return next(run / name for name in reversed(LAST_FILE.values()) if (run / name).is_file())
    if args.resume:
        path = Path(args.resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint file (expected the last.pt, "
                                  "best.pt or tes_last.pt of a run, or 'auto')")
        return path
    return None


def refuse_overwriting_later_work(path: Path, checkpoint: dict) -> None:
    """Resuming continues in the file's folder and rewrites its latest states: refuse when
    one of them is further on than ``path`` (e.g. best.pt next to a later last.pt)."""
    for stage, name in LAST_FILE.items():
        other = path.parent / name
        if list(LAST_FILE).index(stage) < progress(checkpoint)[0]:
            continue  # an earlier stage's state is never further on: not worth loading
        if other.is_file() and other.resolve() != path.resolve() and \
                progress(load_checkpoint(other)) > progress(checkpoint):
            raise CheckpointError(
                f"--resume {path}: its folder holds {name}, a later point of the same run, which "
                "resuming from this file would overwrite. Resume from that file, or copy this one "
                "into a new folder and resume from the copy.")


def changed_flags(saved: dict, args: Namespace, flags: list[str]) -> dict:
    """{flag: [saved, given]} for every flag whose value differs from the saved run's."""
    given = json.loads(json.dumps({k: getattr(args, k) for k in flags}, default=str))
    return {k: [saved.get(k), given[k]] for k in flags if k in saved and saved[k] != given[k]}
