"""The per-dataset scripts: a missing dataset stops them before any work, with the fix in the
message; extra arguments reach train.py (here: a tiny run on a CUB fixture)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_reliability import free_port

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
    # NPROC=2 runs torchrun through the environment's Python: no torchrun on PATH is needed.
    result = run_script("cub", "--data_root", str(cub_root), "--clip_model", "GET-tiny",
                        "--pretrained", "none", "--grad_from_block", "3", "--device", "cpu",
                        "--num_workers", "0",
                        "--batch_size", "8", "--tes_epochs", "1", "--epochs", "1",
                        "--exp_root", str(tmp_path), "--no-progress",
                        NPROC="2", PATH="/usr/bin:/bin", MASTER_PORT=str(free_port()))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run_dir,) = (tmp_path / "cub").glob("get-*")
    config = (run_dir / "config.json").read_text()
    assert '"memax_weight": 2.0' in config and '"epochs": 1' in config  # script's and user's flags
    assert (run_dir / "final_metrics.json").is_file()
