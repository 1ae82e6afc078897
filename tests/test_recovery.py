"""Resume and recovery that never retrains, never overwrites, never lies: each test reproduces
one way a run used to lose work, write a wrong result or a misleading log."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import methods.get
import train
import util.io
from data.data_utils import load_image
from errors import CheckpointError, ImageLoadError, NonFiniteLossError, RunLockedError
from evaluation.evaluate import Evaluator
from tests.helpers import run_dirs, tiny_argv, trainable_weights
from util.io import atomic_save
from util.signals import StopSignal

REPO = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_state(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cub_root) -> Path:
    """A finished two-stage run of 3 stage-2 epochs; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("finished")
    train.main(tiny_argv(out, cub_root, "--epochs", "3", exp_name="done"))
    return run_dirs(out, "done")[0]


def copy_run(finished: Path, tmp_path: Path, name: str = "t-20260101-000000-000000") -> Path:
    target = tmp_path / "cub" / name
    shutil.copytree(finished, target)
    return target


# ----------------------------------------------------------------------- 1. --resume PATH
@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_resume_file_is_read_before_anything_is_trained_or_written(tmp_path, cub_root, finished, content):
    run = copy_run(finished, tmp_path)
    bad = run / "last.pt"
    if content is None:  # a truncated checkpoint
        content = bad.read_bytes()[: bad.stat().st_size // 2]
    bad.write_bytes(content)
    before = folder_state(run)
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        train.main(tiny_argv(tmp_path, cub_root, "--epochs", "3", "--resume", str(bad)))
    assert folder_state(run) == before  # no log line, no config, no TensorBoard file, no training


def test_resume_from_best_next_to_a_later_last_is_refused(tmp_path, cub_root, finished):
    run = copy_run(finished, tmp_path)
    best = torch.load(run / "best.pt", weights_only=True)
    best["loop"]["global_step"] -= 3  # best.pt from an earlier epoch than last.pt
    atomic_save(best, run / "best.pt")
    with pytest.raises(CheckpointError, match="holds last.pt, a later point"):
        train.main(tiny_argv(tmp_path, cub_root, "--epochs", "3", "--resume", str(run / "best.pt")))


def test_last_pt_alone_in_a_folder_resumes_with_its_own_tes(tmp_path, cub_root, finished):
    alone = tmp_path / "cub" / "copy"
    alone.mkdir(parents=True)
    shutil.copy(finished / "last.pt", alone / "last.pt")
    metrics = train.main(tiny_argv(tmp_path, cub_root, "--epochs", "3", "--resume", str(alone / "last.pt")))
    assert not (alone / "tes_last.pt").exists()  # stage 1 was not trained again
    assert metrics == json.loads((finished / "final_metrics.json").read_text())


# ------------------------------------------- 2. a kill between stage 1 and stage 2's first save
def test_stage_2_starts_from_the_same_random_state_after_a_kill_before_its_first_save(tmp_path, cub_root):
    argv = tiny_argv(tmp_path, cub_root, "--epochs", "2", "--word_drop", "0.5")
    reference = train.main(argv + ["--exp_name", "full"])
    train.main(argv + ["--exp_name", "cut", "--stage", "tes"])  # as if killed right after stage 1
    resumed = train.main(argv + ["--exp_name", "cut", "--resume", "auto"])
    assert resumed == reference
    a, b = (trainable_weights(run_dirs(tmp_path, name)[0] / "last.pt") for name in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------- 3, 4. metadata kept, changed flags checked
def test_refused_resume_leaves_the_run_untouched(tmp_path, cub_root, finished):
    run = copy_run(finished, tmp_path)
    before = folder_state(run)
    with pytest.raises(CheckpointError, match="dataset='digits'"):  # digits flags on a CUB run
        train.main(["--dataset_name", "digits", "--clip_model", "GET-tiny", "--pretrained", "none",
                    "--grad_from_block", "2", "--device", "cpu", "--exp_root", str(tmp_path),
                    "--resume", str(run / "last.pt")])
    assert folder_state(run) == before


def test_flags_that_define_the_run_may_not_change_on_resume(tmp_path, cub_root, finished):
    run = copy_run(finished, tmp_path)
    with pytest.raises(CheckpointError, match="flags differ from the run") as error:
        train.main(tiny_argv(tmp_path, cub_root, "--epochs", "6", "--lr", "0.2",
                             "--resume", str(run / "last.pt")))
    assert "--epochs 3 -> 6" in str(error.value) and "--lr 0.1 -> 0.2" in str(error.value)


def test_a_resume_keeps_the_config_and_records_what_it_changed(tmp_path, cub_root, finished):
    run = copy_run(finished, tmp_path)
    config, environment = digest(run / "config.json"), digest(run / "environment.json")
    train.main(tiny_argv(tmp_path, cub_root, "--epochs", "3", "--eval_every", "2",
                         "--resume", str(run / "last.pt")))
    assert (digest(run / "config.json"), digest(run / "environment.json")) == (config, environment)
    (record,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert record["changed"]["eval_every"] == [1, 2] and record["stage"] == "get"


# ---------------------------------------------------------------- 5. resume auto, nothing there
def test_resume_auto_without_a_run_says_so(tmp_path, cub_root, capsys):
    train.main(tiny_argv(tmp_path, cub_root, "--stage", "tes", "--resume", "auto", exp_name="typo"))
    message = "--resume auto: no run of --exp_name typo"
    assert message in capsys.readouterr().out
    assert message in (run_dirs(tmp_path, "typo")[0] / "log.txt").read_text()


# ------------------------------------------------------------------------ 7. one process a run
def test_a_live_run_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, cub_root, finished):
    run = copy_run(finished, tmp_path)
    argv = tiny_argv(tmp_path, cub_root, "--epochs", "3", "--resume", str(run / "last.pt"))
    (run / "run.lock").write_text(f"{os.getpid()} {os.uname().nodename}\n")
    with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()}"):
        train.main(argv)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "run.lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    train.main(argv)
    assert "took over the lock" in (run / "log.txt").read_text() and not (run / "run.lock").exists()


# --------------------------------------------------------------------------- 8, 9. true logs
def test_logs_hold_each_epoch_and_step_once_after_a_kill(tmp_path, cub_root, monkeypatch):
    argv = tiny_argv(tmp_path, cub_root, "--epochs", "3")
    real, calls = train.save_checkpoints, {"n": 0}

    def die_after_logging(stage, *args):  # killed between the metrics line and the save
        calls["n"] += stage.name == "get"
        if calls["n"] == 2:
            raise SystemExit(137)
        real(stage, *args)

    monkeypatch.setattr(train, "save_checkpoints", die_after_logging)
    with pytest.raises(SystemExit):
        train.main(argv)
    monkeypatch.undo()
    (run,) = run_dirs(tmp_path)
    (run / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a killed write
    train.main(argv + ["--resume", "auto"])
    assert not list(run.glob(".*.tmp"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("tes", 0), ("get", 0), ("get", 1), ("get", 2)]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), tag
    assert [e.step for e in events.Scalars("get/loss/total")] == list(range(1, 10))


# ------------------------------------------------------------------- 10, 11. crash reasons
def test_a_crash_reason_reaches_log_txt_and_says_what_is_true(tmp_path, cub_root, monkeypatch):
    def nan_loss(out, *args, **kwargs):
        total, parts = real(out, *args, **kwargs)
        return total * float("nan"), parts

    real = methods.get.dual_branch_loss
    monkeypatch.setattr(methods.get, "dual_branch_loss", nan_loss)
    with pytest.raises(NonFiniteLossError, match="No checkpoint of stage 'get' had been written yet"):
        train.main(tiny_argv(tmp_path, cub_root))
    log = (run_dirs(tmp_path)[0] / "log.txt").read_text()
    assert "run stopped: NonFiniteLossError: non-finite loss in stage 'get' at epoch 0, step 0" in log


def test_command_line_errors_print_the_reason_without_traceback_or_folder(tmp_path):
    argv = tiny_argv(tmp_path, tmp_path / "no_cub_here")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: Dataset 'cub'") and "Traceback" not in result.stderr
    assert not (tmp_path / "cub").exists()


# ------------------------------------------------------------------------- 12. clear errors
def test_truncated_pretrained_file_names_the_flag(tmp_path, cub_root):
    from backbone import load_clip

    torch.manual_seed(0)
    full = tmp_path / "tiny.pt"
    torch.save(load_clip("GET-tiny", None).state_dict(), full)
    full.write_bytes(full.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"--pretrained: could not read the CLIP weights in {full}"):
        train.main(tiny_argv(tmp_path, cub_root, "--pretrained", str(full)))


def test_cifar_download_without_network_names_the_flag(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils
    from urllib.error import URLError

    from errors import DatasetNotFoundError

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(DatasetNotFoundError, match="--download could not fetch it"):
        train.main(["--dataset_name", "cifar10", "--data_root", str(tmp_path / "c10"), "--download",
                    "--clip_model", "GET-tiny", "--pretrained", "none", "--grad_from_block", "2",
                    "--device", "cpu"])


def test_decompression_bomb_is_an_unreadable_image_naming_the_file(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR claims 30000 x 30000 pixels
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match=f"Cannot read image {path}"):
        load_image(path, "cub")


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)
    before = digest(path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(util.io.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="no space left .* previous version of the file is intact"):
        atomic_save({"epoch": 2}, path)
    assert digest(path) == before and list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------------ 14, 15. manners
def test_checkpoints_follow_the_umask(tmp_path):
    atomic_save({"epoch": 1}, tmp_path / "last.pt")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_stop_during_evaluation_abandons_it_and_resumes_exactly(tmp_path, cub_root, monkeypatch):
    argv = tiny_argv(tmp_path, cub_root, "--epochs", "2")
    reference = train.main(argv + ["--exp_name", "full"])
    real = Evaluator.__call__

    def stop_then_evaluate(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(Evaluator, "__call__", stop_then_evaluate)
    assert train.main(argv + ["--exp_name", "cut"]) == {}
    monkeypatch.undo()
    (run,) = run_dirs(tmp_path, "cut")
    assert torch.load(run / "last.pt", weights_only=True)["loop"]["epoch"] == 0  # not evaluated yet
    assert train.main(argv + ["--exp_name", "cut", "--resume", "auto"]) == reference


def test_a_second_signal_exits_at_once():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGTERM)
    assert exit_info.value.code == 128 + signal.SIGTERM
