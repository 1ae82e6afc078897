"""Reliability: multi-process training with torchrun (Gloo, CPU), recovery from SIGKILL,
non-finite losses, unreadable images and checkpoints, evaluation of a saved checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import methods.get
import train
from errors import CheckpointError, ImageLoadError, NonFiniteLossError
from tests.data_fixtures import make_fixture, split_lists, write_cub
from tests.helpers import run_dirs, tiny_argv, trainable_weights

REPO = Path(__file__).resolve().parents[1]


def python_env() -> dict:
    # Same thread count in every process, so that sums are reduced in the same order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO,
                            env=python_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "final_metrics.json").read_text())


def torchrun(argv: list[str], processes: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(REPO / "train.py"), *argv]
    result = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_torchrun_two_processes_matches_single_process_evaluation(tmp_path, tmp_path_factory):
    # 27 training images: over 2 processes they used to be shards of 14 and 13, so with a
    # global batch of 14 one process ran 2 steps and the other 1, and the run hung. Now both
    # run the same single step of 7 samples each.
    root = tmp_path_factory.mktemp("cub27")
    old, new = split_lists("cub")
    write_cub(root, old[:5] + new[:4], n_train=3, n_test=1)
    argv = tiny_argv(tmp_path, root, "--epochs", "1", "--batch_size", "14", exp_name="ddp")
    torchrun(argv)
    (run_dir,) = run_dirs(tmp_path, "ddp")  # one folder: rank 0 alone writes
    ddp = final_metrics(run_dir)
    # Every sample evaluated exactly once across the two ranks: 15 - 7 labelled old-class
    # images + 12 new-class ones unlabelled, 9 test images.
    assert ddp["train_unlabelled/n_samples"] == 20 and ddp["test/n_samples"] == 9
    single = train.main(tiny_argv(tmp_path, root, "--stage", "eval", "--eval_checkpoint",
                                  str(run_dir / "last.pt"), exp_name="eval"))
    assert single == ddp


def test_sigkill_mid_run_then_resume_auto_matches_uninterrupted(tmp_path, cub_root):
    argv = tiny_argv(tmp_path, cub_root, "--epochs", "4")
    train.main(argv + ["--exp_name", "full"])  # here: one torch thread, as the killed process
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv, "--exp_name", "cut"],
                            cwd=REPO, env=python_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:  # kill as soon as stage 2 has written a checkpoint, i.e. somewhere in epoch 1
        deadline = time.time() + 240
        while not list((tmp_path / "cub").glob("cut-*/last.pt")) and time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    (cut_dir,) = run_dirs(tmp_path, "cut")
    assert not (cut_dir / "final_metrics.json").exists()
    train.main(argv + ["--exp_name", "cut", "--resume", "auto"])
    (full_dir,) = run_dirs(tmp_path, "full")
    assert final_metrics(cut_dir) == final_metrics(full_dir)
    a, b = trainable_weights(full_dir / "last.pt"), trainable_weights(cut_dir / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cub_root, monkeypatch):
    real, seen = methods.get.dual_branch_loss, {"calls": 0}

    def nan_in_epoch_1(out, *args, **kwargs):
        seen["calls"] += 1
        total, parts = real(out, *args, **kwargs)
        if seen["calls"] == 5:  # 3 steps per epoch: epoch 1, step 1
            last = next((tmp_path / "cub").glob("t-*/last.pt"))
            seen["last"] = (last, hashlib.sha256(last.read_bytes()).hexdigest())
            parts = {**parts, "cico": torch.tensor(float("nan"))}
            total = total + parts["cico"]
        return total, parts

    monkeypatch.setattr(methods.get, "dual_branch_loss", nan_in_epoch_1)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1 .*cico=nan"):
        train.main(tiny_argv(tmp_path, cub_root, "--epochs", "3"))
    last, digest = seen["last"]
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
    assert torch.load(last, weights_only=True)["loop"]["epoch"] == 1


def test_truncated_checkpoint_is_refused_clearly(tmp_path, cub_root):
    train.main(tiny_argv(tmp_path, cub_root, "--stage", "tes"))
    (run_dir,) = run_dirs(tmp_path)
    data = (run_dir / "tes.pt").read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read checkpoint .*broken.pt"):
        train.main(tiny_argv(tmp_path, cub_root, "--stage", "get", "--tes_checkpoint", str(broken)))


def corrupt_one_training_image(root: Path) -> Path:
    images = sorted((root / "CUB_200_2011" / "images").rglob("*.jpg"))
    victim = images[0]
    victim.write_bytes(victim.read_bytes()[:40])  # a truncated JPEG
    return victim


def test_unreadable_image_is_named_or_skipped_on_request(tmp_path, tmp_path_factory):
    root = make_fixture("cub", tmp_path_factory.mktemp("cub_bad"))
    victim = corrupt_one_training_image(root)
    with pytest.raises(ImageLoadError, match=rf"{victim}.*'cub'"):
        train.main(tiny_argv(tmp_path, root, "--epochs", "1", exp_name="strict"))
    metrics = train.main(tiny_argv(tmp_path, root, "--epochs", "1", "--skip_bad_images",
                                   exp_name="lenient"))
    (run_dir,) = run_dirs(tmp_path, "lenient")
    assert str(victim) in (run_dir / "skipped_images.txt").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_images"] == 1
    assert "skipped 1 unreadable images" in (run_dir / "log.txt").read_text()
    assert metrics["train_unlabelled/n_samples"] == 18
