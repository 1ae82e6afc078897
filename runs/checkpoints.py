"""What a run's checkpoints hold, in one place: their files in the run folder, the keys inside
them, what each stage saves and how it is restored.

    tes.pt        stage 1's result, the TES projector: {"meta", "projector"}
    tes_last.pt   stage 1's training state after every epoch (below)
    last.pt       stage 2's training state after every epoch, with the TES projector
    best.pt       stage 2's training state at the epoch with the best --best_metric

A training state is {"meta", "stage", "loop" (engine.Position), "model" (the trainable
modules' weights: CLIP itself is reloaded), "optimizer", "scheduler", "rng" (every generator),
"args" (the run's flags)}, and in stage 2 "tes_projector" (but for --branches visual, which has
no TES). "meta" is what a checkpoint must
agree on with a run to be used by it (``task_meta``); stage 2's adds the model's architecture
(``model.GETConfig.meta``). Every file is plain data: it loads with ``weights_only=True``
(util/io.py) and never runs code.
"""
from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import open_clip

from data.task import Task
from engine import Position, Stage
from errors import CheckpointError
from model import GETConfig, GETModel, build_get_model
from util.io import atomic_save, load_checkpoint
from util.rng import rng_state, set_rng_state
from vocabulary import STAGE1, STAGE2, STAGES

TES_FILE = "tes.pt"
BEST_FILE = "best.pt"
LAST_FILE = {STAGE1: "tes_last.pt", STAGE2: "last.pt"}  # each stage's latest training state


def task_meta(task: Task, clip_model: str, n_words: int) -> dict:
    """What a checkpoint must agree on with a run to be usable by it."""
    return {"dataset": task.dataset_name, "num_old": task.num_labeled_classes, "num_classes": task.num_classes,
            "clip_model": clip_model, "n_words": n_words}


def save_state(stage: Stage, position: Position, args: Namespace, path: Path) -> None:
    """The full training state of ``stage`` at ``position`` (see the module docstring)."""
    state = {"meta": stage.meta, "stage": stage.name, "loop": asdict(position),
             "model": stage.model.trainable_state_dict(),
             "optimizer": stage.optimizer.state_dict(), "scheduler": stage.scheduler.state_dict(),
             "rng": rng_state(), "args": json.loads(json.dumps(vars(args), default=str))}
    if stage.name == STAGE2 and stage.model.tes is not None:  # its frozen TES, so that the file stands alone
        state["tes_projector"] = stage.model.tes.projector.state_dict()
    atomic_save(state, path)


def restore_state(stage: Stage, checkpoint: Mapping[str, Any]) -> Position:
    """Continue ``stage`` from its training state (already read and validated by --resume)."""
    stage.model.load_trainable_state_dict(checkpoint["model"])
    stage.optimizer.load_state_dict(checkpoint["optimizer"])
    stage.scheduler.load_state_dict(checkpoint["scheduler"])
    set_rng_state(checkpoint["rng"])
    return Position(**checkpoint["loop"])


def save_tes(meta: dict, projector: dict, path: Path) -> None:
    """Stage 1's result."""
    atomic_save({"meta": meta, "projector": projector}, path)


def tes_projector(checkpoint: Mapping[str, Any]) -> dict:
    """The TES projector of a stage-1 result (tes.pt) or of a stage-2 training state."""
    return checkpoint["projector"] if "projector" in checkpoint else checkpoint["tes_projector"]


def load_tes(path: str | Path, expect: Mapping[str, Any], flag: str = "--tes_checkpoint") -> dict:
    """The checkpoint at ``path`` if it holds a TES projector for this run (tes.pt, or a
    stage-2 last.pt / best.pt, which carry theirs)."""
    checkpoint = load_checkpoint(path, expect)
    if not isinstance(checkpoint, dict) or not ({"projector", "tes_projector"} & checkpoint.keys()):
        raise CheckpointError(f"{flag} {path} holds no TES: pass the tes.pt of a run that finished stage 1 "
                              "(or its last.pt / best.pt of stage 2)")
    return checkpoint


def load_stage2_checkpoint(path: str | Path, flag: str, expect: Mapping[str, Any] | None = None) -> dict:
    """``load_checkpoint`` of a checkpoint that must hold a trained stage-2 model (``flag`` names
    the option that gave ``path``, for the message)."""
    checkpoint = load_checkpoint(path, expect)
    if not isinstance(checkpoint, dict) or checkpoint.get("stage") != STAGE2 or not (
            "tes_projector" in checkpoint or checkpoint.get("meta", {}).get("branches") == "visual"):
        raise CheckpointError(f"{flag} {path} is not a stage-2 checkpoint: pass {LAST_FILE[STAGE2]} or "
                              f"{BEST_FILE} of a run that trained stage 2 ({TES_FILE} and "
                              f"{LAST_FILE[STAGE1]} hold stage 1 only)")
    return checkpoint


def model_from_checkpoint(clip: open_clip.CLIP, checkpoint: Mapping[str, Any], path: str | Path,
                          amp: bool = False) -> GETModel:
    """The stage-2 model of a stage-2 checkpoint (read from ``path``), rebuilt from the
    architecture it records, with its trained weights."""
    model = build_get_model(clip, checkpoint.get("tes_projector"), GETConfig.from_meta(checkpoint["meta"]), amp)
    try:
        model.load_trainable_state_dict(checkpoint["model"])
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return model


def progress(checkpoint: Mapping[str, Any]) -> tuple[int, int]:
    """How far a run is at a training state: stage 1 before stage 2, then training steps."""
    return STAGES.index(checkpoint.get("stage")), checkpoint["loop"]["global_step"]
