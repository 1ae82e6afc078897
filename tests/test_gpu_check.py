"""bench/gpu_check.py's CPU mode end to end (``scripts/gpu_check.sh --device cpu``): every step
of the GPU check runs on GET-tiny with a step or two and a few images, and the JSON and the
Markdown it writes hold the measurements; the schedule estimates and the loader workers are
recomputed here from the benchmarks' own files, the dataset sizes checked against
docs/method.md, the K estimate's k-means timed on both paths and extrapolated."""
from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest

from evaluation.k_estimate import brent_search

REPO = Path(__file__).resolve().parents[1]
# The paper's schedule (train.py's defaults): epochs of each stage, samples per step, the
# evaluation cache's budget per split.
TES_EPOCHS, EPOCHS, BATCH, CACHE_BYTES = 200, 200, 128, 8 * 2**30


def training_images_in_method_md() -> dict[str, float]:
    """docs/method.md's "training images" column: {dataset: images} ("about 127,000", "1.28 M")."""
    sizes = {}
    for line in (REPO / "docs" / "method.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.search(r"\d", cells[3]) and cells[0].isidentifier():
            number = float(re.search(r"[\d.,]+", cells[3]).group().replace(",", ""))
            sizes[cells[0]] = number * 1e6 if " M" in cells[3] else number
    return sizes


def test_gpu_check_cpu_mode_writes_the_measurements_and_consistent_estimates(tmp_path):
    from bench import gpu_check

    result = gpu_check.main(["--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "gpu_check-CPU.json").read_text())
    md = (tmp_path / "gpu_check-CPU.md").read_text()
    assert data["card"] == "CPU" and data["ok"] is result["ok"] is True, data["steps"]
    assert all(step["ran"] and step["ok"] for step in data["steps"].values()), data["steps"]
    assert list(data["steps"]) == ["tests", "step_time", "eval_cache", "data_loading", "kmeans", "demo"]

    # The CUDA tier: every test of tests/test_gpu.py collected, and skipped with its reason.
    tree = ast.parse((REPO / "tests" / "test_gpu.py").read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    tests = data["tests"]
    assert {case["name"].split("[")[0] for case in tests["cases"]} == functions
    assert tests["collected"] == tests["skipped"] == len(tests["cases"]) >= len(functions)
    assert all("CUDA" in case["message"] for case in tests["cases"])
    assert f"{tests['skipped']} skipped of {tests['collected']}" in md

    # Rates: positive, and what the benchmarks' own files say.
    raw_step = json.loads((tmp_path / "step_time.json").read_text())
    step = data["step_time"]
    assert step["batch_size"] == 2 and step["clip_model"] == "GET-tiny"
    for kind in ("stage1", "stage2", "eval"):
        row = step["kinds"][kind]
        assert row["images_per_s"] == raw_step[kind]["optimised"]["images_per_s"] > 0
        per_step = 2 if kind == "eval" else 4
        assert math.isclose(row["images_per_s"], per_step / row["seconds_per_step"])
        assert row["gflops_per_image"] > 0 and row["straightforward_images_per_s"] > 0
        assert row["peak_memory_mib"] is None  # measured in fresh processes with --memory only
        assert f"| {kind} | {row['images_per_s']:.1f} |" in md
    raw_cache = json.loads((tmp_path / "eval_cache.json").read_text())
    cache = data["eval_cache"]
    assert cache["cache_device"] == "cpu" and cache["cached_images"] == cache["images"] == 8
    assert math.isclose(cache["cached_images_per_s"], 8 / raw_cache["eval_cached_s"])
    assert math.isclose(cache["uncached_images_per_s"], 8 / raw_cache["eval_uncached_s"])
    # GET-tiny in fp32: (32/8)² + 1 = 17 tokens of width 64 and a 32-wide TES output per image.
    assert math.isclose(cache["bytes_per_image"], (17 * 64 + 32) * 4)
    rows = json.loads((tmp_path / "data_loading.json").read_text())["rows"]
    assert [r["workers"] for r in rows] == [0, 1]
    for r in rows:
        assert r["loader_uncached_samples_per_s"] > 0 and r["loader_cached_samples_per_s"] > 0
        assert math.isclose(r["per_process_cached_samples_per_s"], r["loader_cached_samples_per_s"] / max(r["workers"], 1))

    # The paper's schedule at these rates: images / rate over both stages and the evaluations.
    rate = {kind: raw_step[kind]["optimised"]["images_per_s"] for kind in ("stage1", "stage2", "eval")}
    cached_rate = 8 / raw_cache["eval_cached_s"]
    documented = training_images_in_method_md()
    estimates = data["schedule"]["datasets"]
    assert set(estimates) == {"cifar10", "cifar100", "imagenet_100", "imagenet_1k", "cub", "scars", "aircraft",
                              "herbarium_19"}
    for name, row in estimates.items():
        n, unlabelled = row["train_images"], row["unlabelled_images"]
        assert math.isclose(n, documented[name], rel_tol=0.01), (name, n, documented[name])
        assert 0.5 * n < unlabelled < n
        images = 2 * BATCH * (n // BATCH)  # per epoch: whole batches of two views
        expected = {"stage1_s": TES_EPOCHS * images / rate["stage1"], "stage2_s": EPOCHS * images / rate["stage2"],
                    "eval_s": EPOCHS * unlabelled / rate["eval"]}
        expected["total_s"] = sum(expected.values())
        cached = min(unlabelled, CACHE_BYTES // ((17 * 64 + 32) * 4))
        expected["eval_cached_s"] = (unlabelled / rate["eval"] + (EPOCHS - 1) * (
            cached / cached_rate + (unlabelled - cached) / rate["eval"]))
        expected["total_cached_s"] = expected["stage1_s"] + expected["stage2_s"] + expected["eval_cached_s"]
        for key, value in expected.items():
            assert math.isclose(row[key], value, rel_tol=1e-9), (name, key, row[key], value)
        shown = [f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"
                 for s in (expected["total_s"], expected["total_cached_s"])]
        (line,) = [line for line in md.splitlines() if line.startswith(f"| {name} |")]
        assert all(f"**{text}**" in line for text in shown), (line, shown)
    assert {k: v for k, v in documented.items() if k != "digits"}.keys() == estimates.keys()
    assert estimates["cub"]["steps_per_epoch"] == 46 and estimates["cifar10"]["unlabelled_images"] == 37_500

    # Loader workers: the step's samples/s (images/s over two views) over one process's rate
    # with the most workers measured.
    per_process = rows[-1]
    for kind in ("stage1", "stage2"):
        feed = data["loader_workers"]["stages"][kind]
        demand = rate[kind] / 2
        assert feed["uncached"] == math.ceil(demand / per_process["per_process_uncached_samples_per_s"])
        assert feed["cached"] == math.ceil(demand / per_process["per_process_cached_samples_per_s"])
        assert f"| {kind} | {demand:.1f} | {feed['uncached']} | {feed['cached']} |" in md

    # The K estimate's k-means: the first cell runs both paths; the second, predicted from the
    # first in proportion to N x k, is over the budget and left to torch. The ImageNet-1K-sized
    # search: the k of Brent's search, each path's seconds per N x k of its largest cell.
    kmeans = data["kmeans"]
    assert kmeans == json.loads((tmp_path / "kmeans.json").read_text()) | {"command": kmeans["command"]}
    small, large = kmeans["cells"]
    assert (small["n"], small["k"], large["n"], large["k"]) == (300, 4, 600, 4)
    assert small["torch_inertia"] == pytest.approx(small["sklearn_inertia"], rel=0.05)
    assert large["sklearn_s"] is None and large["sklearn_predicted_s"] == pytest.approx(small["sklearn_s"] * 2)
    search = kmeans["imagenet_1k"]
    assert search["ks"] == list(brent_search(lambda k: -abs(k - 1000) / 1000, 500, 2000)[1])
    for path, cell in (("torch", large), ("sklearn", small)):
        per = cell[f"{path}_s"] / (cell["n"] * cell["k"])
        assert search[path]["seconds"] == pytest.approx(per * 1_281_167 * sum(search["ks"]))
    assert f"| 600 | 4 | {large['torch_s']:.2f} | left out (predicted" in md

    # The demo: train.py with the demo's flags, its final accuracies and run folder.
    demo = data["demo"]
    assert demo["seconds"] > 0 and (Path(demo["run_dir"]) / "final_metrics.json").is_file()
    assert "--device cpu" in demo["command"] and "GET-tiny-digits" in demo["command"]
    heads = [f"train_unlabelled/{head}/all" for head in ("visual", "text", "fused")]
    assert all(0 < demo["metrics"][key] <= 1 for key in heads), demo["metrics"]
