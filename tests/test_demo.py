"""The demo learns: the settings of scripts/run_demo.sh, shortened, must cluster the
unlabelled digits clearly better than chance."""
from __future__ import annotations

import shlex
from pathlib import Path

from argparse import Namespace

import numpy as np

import train
from data.get_datasets import get_class_splits, get_datasets
from util.cluster_and_log_utils import split_cluster_acc_v2

DEMO_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_demo.sh"


def demo_flags() -> list[str]:
    """The train.py flags of scripts/run_demo.sh (so the test follows the script)."""
    text = DEMO_SCRIPT.read_text().replace("\\\n", " ")
    command = next(line for line in text.splitlines() if line.startswith('"$PY" train.py'))
    words = shlex.split(command.split("train.py", 1)[1])
    return [w for w in words if w != "$@"]


def chance_accuracy(y_true: np.ndarray, trials: int = 20) -> float:
    """Mean Hungarian accuracy of uniformly random cluster ids: what a model that learnt nothing
    gets (above 1/K, because the matching picks the luckiest assignment)."""
    rng = np.random.default_rng(0)
    old = y_true < 5
    return float(np.mean([split_cluster_acc_v2(y_true, rng.integers(0, 10, len(y_true)), old)[0]
                          for _ in range(trials)]))


def test_short_demo_beats_chance_clearly(tmp_path):
    # 8 stage-2 epochs instead of 60, evaluated once at the end (~18 s on one core): visual
    # All reaches ~0.36; the full demo reaches ~0.77.
    metrics = train.main(demo_flags() + ["--tes_epochs", "1", "--epochs", "8", "--eval_every", "8",
                                         "--exp_root", str(tmp_path), "--no-progress"])
    args = get_class_splits(Namespace(dataset_name="digits", data_root=None, prop_train_labels=0.5))
    unlabelled = get_datasets("digits", None, None, args)[2]
    chance = chance_accuracy(np.asarray(unlabelled.targets))
    # Chance is ~0.14 here (a constant prediction scores the largest class share, also ~0.14).
    # Twice chance is a margin no untrained or collapsed model reaches.
    assert 0.1 < chance < 0.16
    assert metrics["train_unlabelled/visual/all"] >= 2 * chance, (chance, metrics)
