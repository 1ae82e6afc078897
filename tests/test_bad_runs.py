"""Bad input refused before anything is written, and runs that end as they promise: each test
reproduces one finding of a new user's review (its number in the comments)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import estimate_k
import methods.get
import report
import train
from data.task import task_from_args
from errors import USER_ERRORS, InputError
from params import parse_args
from tests.data_fixtures import write_folder
from tests.helpers import run_dirs, tiny_argv
from util.io import atomic_save
from util.signals import StopSignal

K_OLD = 100  # the old classes of CUB's split, which the tiny CUB fixture keeps


class Code:
    """Pickled as a call of ``print``: a checkpoint holding it carries code."""

    def __reduce__(self):
        return print, ("this code ran",)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cub_root) -> Path:
    """A finished two-stage run (1 stage-2 epoch); tests copy files out of it, never into it."""
    out = tmp_path_factory.mktemp("finished")
    train.main(tiny_argv(out, cub_root, "--epochs", "1", exp_name="done"))
    return run_dirs(out, "done")[0]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, finished) -> Path:
    """A folder of checkpoints that must be refused."""
    folder = tmp_path_factory.mktemp("bad")
    last = (finished / "last.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(last[: len(last) // 2])
    torch.save({"meta": {}, "projector": Code()}, folder / "code.pt")
    tes = torch.load(finished / "tes.pt", weights_only=True)
    atomic_save({**tes, "meta": {**tes["meta"], "dataset": "scars"}}, folder / "scars.pt")
    return folder


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------ 5. checkpoints read before the run folder
CASES = {  # flags ({bad}: the bad files, {done}: the finished run), what the error says
    "eval, missing": (["--stage", "eval", "--eval_checkpoint", "{bad}/missing.pt"], "checkpoint not found"),
    "eval, truncated": (["--stage", "eval", "--eval_checkpoint", "{bad}/truncated.pt"], "could not read"),
    "eval, stage 1": (["--stage", "eval", "--eval_checkpoint", "{done}/tes.pt"], "not a stage-2 checkpoint"),
    "eval, code": (["--stage", "eval", "--eval_checkpoint", "{bad}/code.pt"], "could not read"),
    "get, none to find": (["--stage", "get"], "needs a stage-1 checkpoint"),
    "get, missing": (["--stage", "get", "--tes_checkpoint", "{bad}/missing.pt"], "checkpoint not found"),
    "get, other dataset": (["--stage", "get", "--tes_checkpoint", "{bad}/scars.pt"], "dataset='scars'"),
    "get, code found": (["--stage", "get"], "could not read"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_checkpoint_is_refused_before_a_run_folder(tmp_path, cub_root, finished, bad, case):
    flags, message = CASES[case]
    out = tmp_path / "out"
    if case == "get, code found":  # the tes.pt that --stage get finds in the newest run
        planted = out / "cub" / "t-20260101-000000-000000" / "tes.pt"
        planted.parent.mkdir(parents=True)
        shutil.copy(bad / "code.pt", planted)
    before = files_under(out)
    flags = [flag.format(bad=bad, done=finished) for flag in flags]
    with pytest.raises(USER_ERRORS, match=message) as error:
        train.main(tiny_argv(out, cub_root, *flags))
    assert "\n" not in str(error.value)  # train.py prints it as one line, "error: ..."
    assert files_under(out) == before  # no run folder, no experiment folder, no log


def count_reads(monkeypatch) -> Counter:
    """How often each file is read by torch.load (still reading it)."""
    reads, real = Counter(), torch.load

    def load(f, *args, **kwargs):
        reads[str(f)] += 1
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return reads


def test_stage_get_takes_the_tes_of_a_stage_2_checkpoint_read_once(tmp_path, cub_root, finished, monkeypatch):
    last = finished / "last.pt"
    reads = count_reads(monkeypatch)
    train.main(tiny_argv(tmp_path, cub_root, "--stage", "get", "--tes_checkpoint", str(last)))
    assert reads[str(last)] == 1
    monkeypatch.undo()
    (run,) = run_dirs(tmp_path)
    copy = torch.load(run / "tes.pt", weights_only=True)["projector"]
    original = torch.load(last, weights_only=True)["tes_projector"]
    assert all(torch.equal(copy[k], v) for k, v in original.items())


def test_a_checkpoint_that_gives_k_is_read_once(tmp_path, cub_root, finished, monkeypatch):
    # K to estimate, but the checkpoint has one: it used to be read for K, then again.
    last = finished / "last.pt"
    reads = count_reads(monkeypatch)
    metrics = train.main(tiny_argv(tmp_path, cub_root, "--num_classes", "auto", "--stage", "eval",
                                   "--eval_checkpoint", str(last)))
    assert reads[str(last)] == 1
    assert metrics == json.loads((finished / "final_metrics.json").read_text())


# ----------------------------------------------------------- 6. K and --max_classes vs K_old
@pytest.mark.parametrize("max_classes", [K_OLD - 1, K_OLD])
def test_max_classes_at_most_k_old_is_refused_before_a_run_folder(tmp_path, cub_root, max_classes):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"--max_classes {max_classes} .*{K_OLD} old classes \(K_old\).*"
                                         rf"--max_classes {K_OLD + 1} or more"):
        train.main(tiny_argv(out, cub_root, "--num_classes", "auto", "--max_classes", str(max_classes)))
    assert not out.exists()


def test_k_below_k_old_is_refused_naming_the_range_and_k_old_itself_is_allowed(tmp_path, cub_root):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"K = {K_OLD - 1} \(--num_classes\).*--num_classes {K_OLD} or more"):
        train.main(tiny_argv(out, cub_root, "--num_classes", str(K_OLD - 1)))
    assert not out.exists()
    # K = K_old: no new cluster, but a sound run (and where the K estimate's search starts).
    task = task_from_args(parse_args(tiny_argv(out, cub_root, "--num_classes", str(K_OLD))))
    assert (task.num_classes, task.num_unlabeled_classes) == (K_OLD, 0)


def test_estimate_k_checks_max_classes_before_any_work(tmp_path, cub_root):
    # A missing CLIP file would be the first error if the check came after loading CLIP.
    argv = tiny_argv(tmp_path, cub_root, "--max_classes", str(K_OLD), "--pretrained", str(tmp_path / "none.pt"))
    with pytest.raises(InputError, match=rf"--max_classes {K_OLD} .*--max_classes {K_OLD + 1} or more"):
        estimate_k.main(argv)


# ------------------------------------------------------------------ 8. estimate_k.py --out
@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder"), "train")


def folder_argv(root: Path, *extra: str) -> list[str]:
    return ["--dataset_name", "folder", "--data_root", str(root), "--old_classes", "ant,bee,cat",
            "--max_classes", "12", "--clip_model", "GET-tiny", "--pretrained", "none", "--device", "cpu",
            "--num_workers", "0", "--batch_size", "8", "--no-progress", *extra]


def test_estimate_k_out_in_a_missing_folder_is_written(tmp_path, folder_root):
    out = tmp_path / "not" / "yet" / "k.json"
    estimate = estimate_k.main(folder_argv(folder_root, "--out", str(out)))
    assert json.loads(out.read_text())["k"] == estimate.k


def test_estimate_k_out_that_is_a_folder_is_refused_at_the_start(tmp_path, folder_root):
    argv = folder_argv(folder_root, "--out", str(tmp_path), "--pretrained", str(tmp_path / "none.pt"))
    with pytest.raises(InputError, match=f"--out {tmp_path} is a folder"):
        estimate_k.main(argv)


# --------------------------------------------------- 13. a checkpoint copied alone, resumed
def test_a_checkpoint_resumed_alone_gets_a_config_and_is_reported(tmp_path, cub_root, finished):
    alone = tmp_path / "out" / "cub" / "copy"
    alone.mkdir(parents=True)
    shutil.copy(finished / "last.pt", alone / "last.pt")
    train.main(tiny_argv(tmp_path / "out", cub_root, "--epochs", "1", "--resume", str(alone / "last.pt")))
    config = json.loads((alone / "config.json").read_text())
    assert config["dataset_name"] == "cub" and config["num_labeled_classes"] == K_OLD
    assert "torch" in json.loads((alone / "environment.json").read_text())
    rows = report.main([str(tmp_path / "out"), "--out_dir", str(tmp_path / "report")])
    assert {row["runs"] for row in rows} == {1}


# --------------------------------------------------------- 11. one Ctrl-C under torchrun
def signal_during_step(monkeypatch, *signals: int) -> None:
    """Send ``signals`` to this process, 1 ms apart, while stage 2 computes its second loss."""
    real, calls = methods.get.dual_branch_loss, {"n": 0}

    def loss_then_signals(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            for sig in signals:
                os.kill(os.getpid(), sig)
                time.sleep(0.001)
        return real(*args, **kwargs)

    monkeypatch.setattr(methods.get, "dual_branch_loss", loss_then_signals)


def test_sigint_then_sigterm_at_once_finishes_the_step_and_saves(tmp_path, cub_root, monkeypatch):
    # torchrun passes a Ctrl-C on as SIGINT, then SIGTERM about 1 ms later.
    signal_during_step(monkeypatch, signal.SIGINT, signal.SIGTERM)
    assert train.main(tiny_argv(tmp_path, cub_root, "--log_every", "1")) == {}  # stopped, no error
    (run,) = run_dirs(tmp_path)
    loop = torch.load(run / "last.pt", weights_only=True)["loop"]
    assert (loop["epoch"], loop["step_in_epoch"]) == (0, 2)
    assert "the same stop request" in (run / "log.txt").read_text()


@pytest.mark.parametrize("first, second, wait", [
    (signal.SIGINT, signal.SIGTERM, 0.1),   # the other signal, but later than the window
    (signal.SIGINT, signal.SIGINT, 0.0),    # Ctrl-C twice
    (signal.SIGTERM, signal.SIGTERM, 0.0),
])
def test_a_second_request_still_exits_at_once(first, second, wait):
    with StopSignal(window=0.05) as stop:
        os.kill(os.getpid(), first)
        assert stop.requested
        time.sleep(wait)
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), second)
    assert exit_info.value.code == 128 + second


def test_a_third_signal_exits_at_once():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # the same request
        assert stop.requested
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGINT)
    assert exit_info.value.code == 128 + signal.SIGINT


# --------------------------------------------------------- 19. report.py, bad final metrics
@pytest.mark.parametrize("change, message", [
    (lambda final: {k: v for k, v in final.items() if k != "train_unlabelled/visual/old"},
     "has no train_unlabelled/visual/old"),
    (lambda final: {**final, "train_unlabelled/text/new": "0.5"}, "train_unlabelled/text/new is '0.5', not a number"),
    (lambda final: {**final, "train_unlabelled/text/new": None}, "train_unlabelled/text/new is None, not a number"),
    (lambda final: [final], "is not a JSON object"),
])
def test_report_names_a_final_metrics_file_with_a_missing_key_or_wrong_type(tmp_path, finished, change, message):
    run = tmp_path / "runs" / "cub" / finished.name
    shutil.copytree(finished, run)
    final = run / "final_metrics.json"
    final.write_text(json.dumps(change(json.loads(final.read_text()))))
    with pytest.raises(InputError) as error:
        report.main([str(tmp_path / "runs"), "--out_dir", str(tmp_path / "report")])
    assert str(final) in str(error.value) and message in str(error.value)
