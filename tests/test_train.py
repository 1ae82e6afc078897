"""End-to-end tests of train.py through ``main([...])``, as a user would type the flags, on a
CUB dataset written in its real layout and the tiny randomly initialised CLIP."""
from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch

import methods.get
import train
from errors import CheckpointError
from params import get_args_parser
from runs.run import latest_run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import run_dirs, scalar_tags, tiny_argv, trainable_weights
from util.io import atomic_save

HEADS = ("visual", "text", "fused")
SPLITS = ("train_unlabelled", "test")


def test_both_stages_leave_every_artefact(tmp_path, cub_root):
    metrics = train.main(tiny_argv(tmp_path, cub_root))
    (run_dir,) = run_dirs(tmp_path)
    for name in ("log.txt", "config.json", "environment.json", "metrics.jsonl", "tes.pt",
                 "tes_last.pt", "last.pt", "best.pt", "final_metrics.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["dataset_name"] == "cub"
    assert "final accuracy" in (run_dir / "log.txt").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("tes", 0), ("get", 0), ("get", 1)]
    # Every unlabelled training image (18) and every test image (6 classes x 2) is evaluated once.
    assert metrics["train_unlabelled/n_samples"] == 18 and metrics["test/n_samples"] == 12
    for key in [f"{s}/{h}/{g}" for s in SPLITS for h in HEADS for g in ("all", "old", "new")]:
        assert 0.0 <= metrics[key] <= 1.0

    tags = scalar_tags(run_dir)
    expected = {"tes/loss/total", "tes/loss/align", "tes/loss/distill_ce", "tes/loss/distill_mse",
                "tes/lr", "get/loss/total", "get/loss/cico", "get/lr", "get/teacher_temp"}
    expected |= {f"get/loss/{b}/{c}" for b in ("visual", "text")
                 for c in ("cls", "self_distill", "memax", "info_nce", "supcon", "total")}
    expected |= {f"eval/{s}/{h}/{g}" for s in SPLITS for h in HEADS for g in ("all", "old", "new")}
    assert expected <= tags, sorted(expected - tags)

    # The stage-1 checkpoint holds only what stage 2 needs: the projector and its set-up.
    tes = torch.load(run_dir / "tes.pt", weights_only=True)
    assert set(tes) == {"meta", "projector"}
    assert set(tes["projector"]) == {"weight", "bias"}


def test_stage_get_alone_finds_the_stage_1_checkpoint(tmp_path, cub_root):
    train.main(tiny_argv(tmp_path, cub_root, "--stage", "tes"))
    (tes_run,) = run_dirs(tmp_path)
    assert (tes_run / "tes.pt").is_file() and not (tes_run / "last.pt").exists()
    metrics = train.main(tiny_argv(tmp_path, cub_root, "--stage", "get", "--epochs", "1"))
    assert metrics["test/n_samples"] == 12
    get_run = run_dirs(tmp_path)[-1]
    assert str(tes_run / "tes.pt") in (get_run / "log.txt").read_text()
    # The stage-2 run keeps a copy of its TES, so that resuming it cannot pick up another one.
    copy, original = (torch.load(r / "tes.pt", weights_only=True) for r in (get_run, tes_run))
    assert copy["meta"] == original["meta"]
    assert all(torch.equal(copy["projector"][k], v) for k, v in original["projector"].items())


def test_resume_auto_picks_the_newest_run_of_exactly_this_name(tmp_path):
    args = get_args_parser().parse_args(["--exp_root", str(tmp_path), "--exp_name", "t"])
    for name, ckpt in (("t-20260101-000000-000000", "last.pt"),
                       ("t-20260102-000000-000000", "tes_last.pt"),  # newer, still in stage 1
                       ("t-old-20260103-000000-000000", "last.pt"),  # another --exp_name
                       ("t-20260104-000000-000000", "config.json")):  # nothing to resume
        (tmp_path / "cub" / name).mkdir(parents=True)
        (tmp_path / "cub" / name / ckpt).touch()
    assert latest_run(args, "last.pt", "tes_last.pt").name == "t-20260102-000000-000000"
    assert latest_run(args, "last.pt").name == "t-20260101-000000-000000"


def interrupt_at_call(monkeypatch, call: int) -> None:
    """Send SIGTERM to this process while stage 2 computes its ``call``-th loss."""
    real, calls = methods.get.dual_branch_loss, {"n": 0}

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(methods.get, "dual_branch_loss", loss_then_signal)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, cub_root, monkeypatch, workers):
    # --log_every 1: the stop request is seen right after the step in which it arrives.
    argv = tiny_argv(tmp_path, cub_root, "--epochs", "3", "--word_drop", "0.5", "--log_every", "1")
    reference = train.main(argv + ["--exp_name", "full"])
    # Each sample's augmentation follows its own seed: loader workers change nothing, and a
    # run resumed mid-epoch with workers is exact too.
    argv += ["--num_workers", workers]

    # 24 images / batch 8 = 3 steps per epoch: call 5 is the second step of epoch 1.
    interrupt_at_call(monkeypatch, 5)
    assert train.main(argv + ["--exp_name", "cut"]) == {}
    (run_dir,) = run_dirs(tmp_path, "cut")
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert (ckpt["loop"]["epoch"], ckpt["loop"]["step_in_epoch"]) == (1, 2)
    monkeypatch.undo()

    resumed = train.main(argv + ["--exp_name", "cut", "--resume", "auto"])
    assert resumed == reference
    (full_dir,) = run_dirs(tmp_path, "full")
    a, b = trainable_weights(full_dir / "last.pt"), trainable_weights(run_dir / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_dirs(tmp_path, "cut") == [run_dir]  # resumed in place, no new folder


def test_missing_tes_checkpoint_is_a_clear_error(tmp_path, cub_root):
    with pytest.raises(CheckpointError, match="--tes_checkpoint"):
        train.main(tiny_argv(tmp_path, cub_root, "--stage", "get"))


def test_tes_checkpoint_of_another_set_up_is_refused(tmp_path, cub_root):
    train.main(tiny_argv(tmp_path, cub_root, "--stage", "tes"))
    (run_dir,) = run_dirs(tmp_path)
    ckpt = torch.load(run_dir / "tes.pt", weights_only=True)
    for key, value in (("dataset", "scars"), ("num_classes", 7)):
        foreign = tmp_path / f"foreign_{key}.pt"
        atomic_save({**ckpt, "meta": {**ckpt["meta"], key: value}}, foreign)
        with pytest.raises(CheckpointError, match=f"{key}={value!r}"):
            train.main(tiny_argv(tmp_path, cub_root, "--stage", "get", "--tes_checkpoint", str(foreign)))


@pytest.mark.parametrize("flags, message", [
    (["--dataset_name", "mnist"], "invalid choice: 'mnist'"),
    (["--eval_func", "v3"], "invalid choice: 'v3'"),
    (["--stage", "both"], "invalid choice: 'both'"),
    (["--grad_from_block", "5"], r"--grad_from_block must be in \[0, 4\]"),
    (["--prop_train_labels", "0"], r"--prop_train_labels must be in \(0, 1\]"),
    (["--batch_size", "1"], "--batch_size must be at least 2"),
    (["--best_metric", "test/visual/mean"], "--best_metric must look like"),
    (["--prompt_template", "{} and {}"], "--prompt_template .* must hold exactly one"),
    (["--prompt_template", "a photo of a {name}"], "--prompt_template .* must hold exactly one"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, cub_root, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_argv(tmp_path, cub_root, *flags))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "cub").exists()  # refused before a run folder was made


def test_global_batch_not_divisible_by_the_processes_is_refused(tmp_path, cub_root, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node 3 sets it
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_argv(tmp_path, cub_root, "--batch_size", "8"))
    assert exit_info.value.code == 2
    assert "--batch_size 8 is the global batch: it must be a multiple of the 3" in capsys.readouterr().err
    assert not (tmp_path / "cub").exists()


def test_loss_terms_brought_to_the_host_every_n_steps_log_the_same(tmp_path, cub_root):
    records = {}
    for every in ("1", "2"):
        train.main(tiny_argv(tmp_path, cub_root, "--log_every", every, exp_name=f"every{every}"))
        (run_dir,) = run_dirs(tmp_path, f"every{every}")
        records[every] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        # 3 steps an epoch, 2 epochs: every step logged once, whatever the flush period.
        assert [e.step for e in events.Scalars("get/loss/cico")] == [1, 2, 3, 4, 5, 6]
    assert records["1"] == records["2"]
