"""The per-dataset scripts: a missing dataset stops them before any work, with the fix in the
message; extra arguments reach train.py, on two processes through torchrun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"cifar10": "GET_CIFAR10_ROOT", "cifar100": "GET_CIFAR100_ROOT",
           "imagenet100": "GET_IMAGENET_ROOT", "imagenet1k": "GET_IMAGENET_ROOT",
           "cub": "GET_CUB_ROOT", "scars": "GET_SCARS_ROOT", "aircraft": "GET_AIRCRAFT_ROOT",
           "herb19": "GET_HERB19_ROOT"}


def run_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    # GET_PYTHON: use this interpreter, so the script installs nothing.
    full_env = {**os.environ, "GET_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(REPO / "scripts" / f"run_{name}.sh"), *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name, variable", sorted(SCRIPTS.items()))
def test_missing_dataset_stops_the_script_with_the_fix(tmp_path, name, variable):
    missing = tmp_path / "nowhere"
    result = run_script(name, **{variable: str(missing)})
    assert result.returncode != 0
    assert str(missing) in result.stderr and variable in result.stderr
    assert "--data_root" in result.stderr


def test_extra_arguments_reach_train_py_on_two_processes(tmp_path, cub_root):
    # NPROC=2 runs torchrun as a module of the environment's Python (no torchrun on PATH is
    # needed), here a stand-in that records its arguments: the real two-process runs are in
    # test_ddp.py and test_reliability.py.
    log, fake = tmp_path / "calls.txt", tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$FAKE_LOG"\n')
    fake.chmod(0o755)
    result = run_script("cub", "--data_root", str(cub_root), "--epochs", "1", NPROC="2", PATH="/usr/bin:/bin",
                        GET_PYTHON=str(fake), FAKE_LOG=str(log))
    assert result.returncode == 0, result.stderr[-2000:]
    check, launch = log.read_text().splitlines()  # the dataset check, then torchrun
    assert check.split() == ["-", "cub", str(cub_root)]
    words = launch.split()
    assert words[:4] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    # train.py gets the script's flags, then the user's, which therefore win.
    assert words[words.index("train.py"):] == ["train.py", "--dataset_name", "cub", "--exp_name", "get",
                                               "--data_root", str(cub_root), "--epochs", "1"]
