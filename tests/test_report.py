"""report.py on real runs of train.py (the digits demo, two seeds): means and sample stds
against the runs' own final_metrics.json, the published column, the notes about runs that
should not be pooled, the plots; scripts/run_seeds.sh's commands through a stand-in Python."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import report
import train
from params import parse_args

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)


def tiny_digits_argv(out: Path, seed: int, exp_name: str) -> list[str]:
    return ["--dataset_name", "digits", "--clip_model", "GET-tiny", "--pretrained", "none", "--device", "cpu",
            "--grad_from_block", "2", "--tes_epochs", "1", "--epochs", "2", "--max_steps_per_epoch", "3",
            "--batch_size", "16", "--num_workers", "0", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32",
            "--exp_root", str(out), "--exp_name", exp_name, "--no-progress", "--seed", str(seed)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two finished runs of one experiment ('get'), seeds 0 and 1, as run_seeds.sh names them."""
    out = tmp_path_factory.mktemp("runs")
    for seed in SEEDS:
        train.main(tiny_digits_argv(out, seed, f"get-seed{seed}"))
    return out


def final_metrics(out: Path) -> list[dict]:
    found = sorted((out / "digits").glob("get-seed*/final_metrics.json"))
    assert len(found) == len(SEEDS)
    return [json.loads(p.read_text()) for p in found]


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["head"]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("split", ["train_unlabelled", "test"])
def test_means_and_sample_stds_over_the_seeds(runs, tmp_path, capsys, split):
    report.main([str(runs), "--out_dir", str(tmp_path), "--split", split])
    rows = read_rows(tmp_path / "results.csv")
    a, b = final_metrics(runs)
    assert set(rows) == {"visual", "text", "fused"}
    for head, row in rows.items():
        assert (row["dataset"], row["experiment"], row["split"]) == ("digits", "get", split)
        assert row["runs"] == "2" and row["seeds"] == "0 1"
        for group in ("all", "old", "new"):
            x, y = 100 * a[f"{split}/{head}/{group}"], 100 * b[f"{split}/{head}/{group}"]
            # Two values: mean (x + y) / 2, sample standard deviation |x - y| / sqrt(2).
            assert float(row[f"{group}_mean"]) == pytest.approx((x + y) / 2, abs=1e-3)
            assert float(row[f"{group}_std"]) == pytest.approx(abs(x - y) / math.sqrt(2), abs=1e-3)
        assert row["published_all"] == ""  # none known for the demo
    markdown = (tmp_path / "results.md").read_text()
    assert markdown in capsys.readouterr().out
    x, y = 100 * a[f"{split}/fused/all"], 100 * b[f"{split}/fused/all"]
    assert f"| get | fused | 2 | 0 1 | {(x + y) / 2:.1f} ± {abs(x - y) / math.sqrt(2):.1f} |" in markdown
    assert "## digits" in markdown and "Notes" not in markdown


def test_published_numbers_come_from_the_csv_with_their_source(runs, tmp_path):
    shipped = report.read_published(report.PUBLISHED)
    assert {k: v[0] for k, v in shipped.items()} == {
        "cifar10": {"all": 97.2}, "cifar100": {"all": 82.1}, "imagenet_100": {"all": 91.7},
        "imagenet_1k": {"all": 62.4}, "cub": {"all": 77.0}, "scars": {"all": 78.5}, "aircraft": {"all": 58.9}}
    assert all("GET" in source and "2403.09974" in source for _, source in shipped.values())
    mine = tmp_path / "published.csv"  # a user's own line, as the README says to add
    mine.write_text("dataset,all,source\ndigits,42.5,my notebook\n")
    report.main([str(runs), "--out_dir", str(tmp_path / "r"), "--published", str(mine)])
    rows = read_rows(tmp_path / "r" / "results.csv")
    # Beside the head the paper reports only: the visual one, first.
    assert list(rows) == ["visual", "text", "fused"] and rows["visual"]["reported"] == "True"
    assert {head: row["published_all"] for head, row in rows.items()} == {"visual": "42.5", "text": "", "fused": ""}
    markdown = (tmp_path / "r" / "results.md").read_text()
    assert "| get | **visual** (reported) |" in markdown and "| 42.5 |" in markdown
    assert "Published: my notebook" in markdown
    with_groups = tmp_path / "groups.csv"  # Old and New, where a source gives them
    with_groups.write_text("dataset,all,old,new,source\ndigits,42.5,40.0,43.25,my table\n")
    report.main([str(runs), "--out_dir", str(tmp_path / "g"), "--published", str(with_groups)])
    assert "| 42.5 / 40.0 / 43.2 |" in (tmp_path / "g" / "results.md").read_text()
    # The published numbers are transductive: not shown beside the test split.
    report.main([str(runs), "--out_dir", str(tmp_path / "t"), "--published", str(mine), "--split", "test"])
    assert "42.5" not in (tmp_path / "t" / "results.md").read_text()


def test_unfinished_runs_are_left_out_and_odd_groups_noted(runs, tmp_path):
    folder = tmp_path / "outputs"
    shutil.copytree(runs, folder)
    run0, run1 = sorted((folder / "digits").glob("get-seed*"))
    unfinished = shutil.copytree(run1, folder / "digits" / "get-seed2-unfinished")
    (unfinished / "final_metrics.json").unlink()
    again = shutil.copytree(run0, folder / "digits" / "get-seed0-again")  # seed 0 twice, other epochs
    config = json.loads((again / "config.json").read_text())
    config["epochs"] = 3
    (again / "config.json").write_text(json.dumps(config))
    rows = report.main([str(folder), "--out_dir", str(tmp_path / "r")])
    assert {row["runs"] for row in rows} == {3}
    markdown = (tmp_path / "r" / "results.md").read_text()
    assert "1 run folder(s) without final_metrics.json" in markdown
    assert "seed(s) [0] appear in more than one run" in markdown
    assert "differ in --epochs (2, 3)" in markdown


def test_plots_are_written(runs, tmp_path):
    import matplotlib.image

    report.main([str(runs), "--out_dir", str(tmp_path), "--plots"])
    png = tmp_path / "plots" / "digits_get.png"
    assert png.stat().st_size > 10_000
    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.05  # drawn on, not a blank canvas


def test_no_finished_run_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished run"):
        report.main([str(tmp_path), "--out_dir", str(tmp_path / "r")])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        report.main([str(tmp_path / "nowhere")])


def run_seeds(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """scripts/run_seeds.sh with a stand-in for Python that records its arguments."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$FAKE_LOG"\n')
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(REPO / "scripts" / "run_seeds.sh"), *args], cwd=REPO, text=True,
                            capture_output=True, timeout=60,
                            env={**os.environ, "GET_PYTHON": str(fake), "FAKE_LOG": str(log), **env})
    calls = [line.split() for line in log.read_text().splitlines()] if log.is_file() else []
    return result, calls


def test_run_seeds_runs_each_seed_under_its_own_name(tmp_path):
    result, calls = run_seeds(tmp_path, "digits", "2", "--exp_name", "lr05", "--lr", "0.05", FIRST_SEED="3")
    assert result.returncode == 0, result.stderr
    assert len(calls) == 2
    for seed, call in zip((3, 4), calls):
        assert call[0] == "train.py"
        args = parse_args(call[1:])  # what train.py will see: the demo's flags, then ours
        assert (args.dataset_name, args.seed, args.exp_name, args.lr) == ("digits", seed, f"lr05-seed{seed}", 0.05)
        assert report.experiment_name(args.exp_name) == "lr05"


@pytest.mark.parametrize("argv, message", [
    (("mnist", "2"), "unknown DATASET"),
    (("digits", "0"), "positive number of seeds"),
    (("digits", "2", "--seed", "5"), "FIRST_SEED"),
])
def test_run_seeds_refuses_bad_arguments(tmp_path, argv, message):
    result, calls = run_seeds(tmp_path, *argv)
    assert result.returncode == 2 and message in result.stderr and not calls
