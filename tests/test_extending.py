"""docs/extending.md, done: each recipe's edits applied, exactly as the page writes them, to a
copy of the repository, then a short training run with it through ``train.py``. A recipe whose
anchor line no longer exists, or whose code no longer trains, fails here."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import scalar_tags, tiny_argv

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "extending.md"
EDIT = re.compile(r"<!-- edit: (?P<file>\S+) \| (?P<how>new file|after|before|replace)(?:: (?P<anchor>.*?))? -->\n"
                  r"```\w*\n(?P<code>.*?)```", re.S)
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "outputs", "datasets", "tests", "bench", "docs", "weights",
                                    "scripts", "__pycache__", ".pytest_cache")


@dataclass
class Edit:
    file: str
    how: str           # 'new file', 'after', 'before' or 'replace'
    anchor: str | None  # the line (stripped) after / before which the code goes, or that it replaces
    code: str


def recipe(number: int) -> list[Edit]:
    """The edits of section ``number`` of docs/extending.md, in order."""
    section = re.split(r"^## ", DOC.read_text(), flags=re.M)[number]
    assert section.startswith(f"{number}. ")
    return [Edit(m["file"], m["how"], m["anchor"], m["code"]) for m in EDIT.finditer(section)]


def apply(edit: Edit, root: Path) -> None:
    path = root / edit.file
    if edit.how == "new file":
        assert not path.exists(), edit.file
        path.write_text(edit.code)
        return
    lines = path.read_text().splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.strip() == edit.anchor.strip()]
    assert len(at) == 1, f"{edit.file}: the anchor {edit.anchor!r} is on {len(at)} lines, not 1"
    i = at[0]
    new = edit.code.splitlines(keepends=True)
    lines[i:i + 1] = {"after": [lines[i], *new], "before": [*new, lines[i]], "replace": new}[edit.how]
    path.write_text("".join(lines))


def with_recipes(numbers: list[int], tmp_path: Path) -> Path:
    """A copy of the repository's code with the recipes ``numbers`` applied in turn; each
    changes at most two files."""
    root = tmp_path / "repo"
    shutil.copytree(REPO, root, ignore=NOT_COPIED)
    for number in numbers:
        edits = recipe(number)
        assert edits and len({edit.file for edit in edits}) <= 2, number
        for edit in edits:
            apply(edit, root)
    return root


def train(root: Path, argv: list[str]) -> tuple[Path, str]:
    """``python train.py argv`` in ``root``; the run folder and what the run printed."""
    done = subprocess.run([sys.executable, "train.py", *argv], cwd=root, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = Path(argv[argv.index("--exp_root") + 1])
    (run_dir,) = out.glob("*/t-*")
    return run_dir, done.stdout


def last_epoch_loss(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["stage"] == "get"][-1]["loss"]


def write_my_dataset(root: Path) -> None:
    """The layout recipe 1's reader expects: 6 classes, 4 training and 2 test images each."""
    rng = np.random.default_rng(0)
    rows = ["path,class,split"]
    for cls in range(6):
        for i in range(6):
            name = f"img/{cls}_{i}.png"
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name)
            rows.append(f"{name},{cls},{'train' if i < 4 else 'test'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def test_the_four_recipes_train_together(tmp_path):
    """All four recipes on one copy, one run (one Python start-up instead of four): the new
    dataset, with the loss term at 0.5, the head, and the new CLIP trained from its last block."""
    root = with_recipes([1, 2, 3, 4], tmp_path)
    write_my_dataset(tmp_path / "my_data")
    argv = tiny_argv(tmp_path / "out", tmp_path / "my_data", "--head_agreement_weight", "0.5")
    argv[argv.index("cub")] = "my_dataset"
    argv[argv.index("GET-tiny")] = "GET-small"
    argv[argv.index("--grad_from_block") + 1] = "5"
    run_dir, printed = train(root, argv)

    # 1. The dataset: 12 images of the 3 old classes, half of them labelled; the 12 of the new
    # classes unlabelled.
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["num_labeled_classes"], config["num_unlabeled_classes"]) == (3, 3)
    assert "dataset my_dataset: 6 labelled + 18 unlabelled training images" in printed
    assert json.loads((run_dir / "final_metrics.json").read_text())["train_unlabelled/n_samples"] == 18
    # 2 and 3. The loss term, with its weight, and the head's self-distillation are in the total
    # (epoch means are linear in the steps' terms).
    loss = last_epoch_loss(run_dir)
    assert loss["head_agreement"] > 0 and "get/loss/head_agreement" in scalar_tags(run_dir)
    parts = (loss["visual/total"] + loss["text/total"] + loss["cico"] + 0.5 * loss["head_agreement"]
             + loss["aux/self_distill"])
    assert loss["total"] == pytest.approx(parts, rel=1e-5)
    state = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    assert state["aux_head.weight_v"].shape[0] == 2 * state["head.weight_v"].shape[0]  # 2K clusters
    assert "aux_head" in (run_dir / "log.txt").read_text()  # a trainable row of the parameter table
    # 4. The new CLIP: 6 blocks, the last one trained.
    assert {key.split(".")[4] for key in state if key.startswith("clip.visual.transformer.resblocks.")} == {"5"}
