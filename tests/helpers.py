"""Helpers shared by the end-to-end tests of train.py."""
from __future__ import annotations

from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def tiny_argv(out: Path, data_root: Path, *extra: str, exp_name: str = "t") -> list[str]:
    return ["--dataset_name", "cub", "--data_root", str(data_root), "--clip_model", "GET-tiny",
            "--pretrained", "none", "--device", "cpu", "--num_workers", "0", "--batch_size", "8",
            "--tes_epochs", "1", "--epochs", "2", "--grad_from_block", "2",
            "--exp_root", str(out), "--exp_name", exp_name, "--no-progress", *extra]


def run_dirs(out: Path, exp_name: str = "t", dataset: str = "cub") -> list[Path]:
    return sorted((out / dataset).glob(f"{exp_name}-*"))


def scalar_tags(run_dir: Path) -> set[str]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def trainable_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]
