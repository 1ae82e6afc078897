"""One command that checks a GPU and measures it for docs/benchmarks.md (scripts/gpu_check.sh).

    bash scripts/gpu_check.sh                                  # the GPU check: under 10 min on one H100
    python bench/gpu_check.py --device cuda --out outputs/gpu_check
    python bench/gpu_check.py --device cpu --out /tmp/check     # CPU mode: tiny sizes, the same code path

Steps, in this order; each is recorded, a failing one does not stop the others, and the JSON and
the Markdown are rewritten after every step (a check cut short keeps what it measured):

1. ``tests``: the CUDA tier, ``python -m pytest -m cuda tests/test_gpu.py`` in a fresh process
   (without CUDA every test is skipped with its reason). Its findings (attention kernels, TF32
   switches, the compiled model's differences, the short demo's accuracy) come back through
   GET_GPU_TEST_REPORT.
2. ``step_time``: bench/step_time.py, ViT-B-16 with random weights (it never loads weights:
   nothing to download), batch 128, bf16 autocast: stage 1, stage 2 and evaluation, images/s,
   GFLOP/image and the peak memory of each (each in a fresh process, ``--memory_kinds``).
3. ``eval_cache``: bench/eval_cache.py, 2048 images, batch 256, bf16, the budget of train.py's
   default ``--eval_cache_gb 8``.
4. ``data_loading``: bench/data_loading.py, 768 JPEGs of 500x375, 0 4 8 16 loader workers,
   with and without the image cache.
5. ``kmeans``: bench/estimate_k.py, the K estimate's k-means on the GPU at 100k and 1M points
   x 512 for k = 100 and 1,000 (scikit-learn's on the CPU where it fits the step's budget), and
   what an ImageNet-1K-sized estimate takes on the card.
6. ``demo``: train.py with scripts/run_demo.sh's flags on the GPU (both stages, 5 + 40 epochs).

From the measured rates it then estimates the wall time of each benchmark's full paper schedule
on the card (``schedule``) and the loader workers that keep the GPU fed (``loader_workers``),
and writes ``gpu_check-<card>.json`` and ``gpu_check-<card>.md`` (a section ready for
docs/benchmarks.md) in ``--out``, with each step's own files (tests.xml, tests.log,
step_time.json, ...). The CPU mode (``--device cpu``) runs every step on GET-tiny with a few
steps and images: tests/test_gpu_check.py runs it in CI. With cuda a step that would end after
``--max_minutes`` (10) by its expected time is left out and reported. Exit status 0 when no step
failed or was left out for time (``--skip`` leaves steps out on purpose) and no test failed.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = ("tests", "step_time", "eval_cache", "data_loading", "kmeans", "demo")
KINDS = ("stage1", "stage2", "eval")

# The standard GCD benchmarks: (training images, of which unlabelled). Training images: docs/method.md
# ("Data"); unlabelled = training images minus the labelled half of the old classes' images, as
# tabulated by the GCD paper (Vaze et al., CVPR 2022, Table 1; SimGCD's for ImageNet-1K), exact for
# CIFAR, rounded to 100 images elsewhere (ImageNet-100's training set: the sum of its two rounded
# figures).
DATASETS = {
    "cifar10": (50_000, 37_500),
    "cifar100": (50_000, 30_000),
    "imagenet_100": (127_200, 95_300),
    "imagenet_1k": (1_281_167, 960_000),
    "cub": (5_994, 4_500),
    "scars": (8_144, 6_100),
    "aircraft": (6_667, 5_000),
    "herbarium_19": (34_225, 25_400),
}
SIZES_SOURCE = ("training images: docs/method.md; unlabelled: GCD (Vaze et al., CVPR 2022) Table 1, "
                "SimGCD for ImageNet-1K; exact for CIFAR, rounded to 100 images elsewhere")


@dataclass(frozen=True)
class Plan:
    """The sizes of one mode's measurements."""
    clip_model: str
    batch_size: int             # step_time: samples per step (two views each)
    steps: int
    warmup: int
    num_classes: int
    memory: bool                # peak memory of each step, each path in a fresh process
    eval_images: int
    eval_batch: int
    eval_repeats: int
    loading_images: int
    loading_size: tuple[int, int]
    loading_image_size: int
    loading_batch: int
    loading_workers: tuple[int, ...]
    loading_repeats: int
    kmeans_sizes: tuple[int, ...]  # estimate_k: points, clusters, repeats, and scikit-learn's budget
    kmeans_ks: tuple[int, ...]     # per k-means (a cell predicted to take longer is left to torch)
    kmeans_repeats: int
    kmeans_sklearn_budget: float
    demo_extra: tuple[str, ...]  # train.py flags after the demo's
    tests_timeout_s: int
    expected_s: dict = None      # about how long each step takes: a step that would end past
                                 # --max_minutes is left out (None: no budget)


PLANS = {
    "cuda": Plan("ViT-B-16", 128, 10, 3, 200, True, 2048, 256, 3, 768, (500, 375), 224, 32, (0, 4, 8, 16), 3,
                 (100_000, 1_000_000), (100, 1000), 3, 30.0, (), 420,
                 {"tests": 240, "step_time": 90, "eval_cache": 30, "data_loading": 60, "kmeans": 60, "demo": 100}),
    # CPU mode: the same steps on GET-tiny, one or two steps each, a few images (CI: about 15 s).
    "cpu": Plan("GET-tiny", 2, 1, 1, 10, False, 8, 4, 1, 8, (64, 48), 32, 4, (0, 1), 1, (300, 600), (4,), 1, 1e-9,
                ("--tes_epochs", "1", "--epochs", "1", "--max_steps_per_epoch", "2", "--eval_every", "1"), 120),
}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda: the GPU check (the first GPU); cpu: tiny sizes, the same code path")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check", help="folder of the results")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: " + ",".join(STEPS))
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="peak memory of each step in fresh processes (default: on with cuda, off on the CPU, "
                        "where the six processes take a minute)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="data_loading's loader workers (default 0 4 8 16 with cuda, 0 1 on the CPU)")
    p.add_argument("--max_minutes", type=float, default=10.0,
                   help="with cuda, leave out a step that would end after this many minutes (each step's "
                        "expected time: Plan.expected_s); 0: no limit")
    args = p.parse_args(argv)
    skipped = {s for s in args.skip.split(",") if s}
    if skipped - set(STEPS):
        p.error(f"--skip: unknown {', '.join(sorted(skipped - set(STEPS)))}; the steps are {','.join(STEPS)}")
    args.skipped = skipped
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here; --device cpu runs the check's CPU mode")
    return args


# ----------------------------------------------------------------------------- the card
def card_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "CPU"


def card_slug(name: str) -> str:
    """The card's name as a file name: NVIDIA H100 80GB HBM3 -> NVIDIA_H100_80GB_HBM3."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "device"


def machine_info(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", gpus_visible=torch.cuda.device_count())
    return info


# ----------------------------------------------------------------------------- the steps
def run_tests(plan: Plan, out: Path, device: str) -> dict:
    """The CUDA tier in a fresh process; its cases from JUnit XML, its findings from the report file."""
    xml, report, log = out / "tests.xml", out / "tests_report.json", out / "tests.log"
    for path in (xml, report):
        path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
               "tests/test_gpu.py", f"--junitxml={xml}"]
    env = {**os.environ, "GET_GPU_TEST_REPORT": str(report)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU mode checks that the tier skips cleanly, even beside a GPU
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=plan.tests_timeout_s)
        returncode, output, timed_out = done.returncode, done.stdout + done.stderr, False
    except subprocess.TimeoutExpired as err:
        returncode, timed_out = None, True
        output = "".join(part.decode() if isinstance(part, bytes) else part or "" for part in (err.stdout, err.stderr))
    log.write_text(output)
    result = {"command": "python " + " ".join(command[1:]), "returncode": returncode, "timed_out": timed_out,
              "seconds": time.perf_counter() - start, **junit_cases(xml),
              "report": json.loads(report.read_text()) if report.is_file() else {}}
    if timed_out or result["collected"] == 0 or returncode not in (0, 5) and not result["failed"] + result["errors"]:
        result["tail"] = output[-3000:]
    return result


def junit_cases(xml: Path) -> dict:
    """Counts and cases of a pytest JUnit XML file (all zero when there is none)."""
    cases = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    message = child.get("message") or (child.text or "")[:500]
                    break
            cases.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                          "message": message})
    counts = {key: sum(c["outcome"] == key for c in cases) for key in ("passed", "failed", "error", "skipped")}
    return {"collected": len(cases), "passed": counts["passed"], "failed": counts["failed"],
            "errors": counts["error"], "skipped": counts["skipped"], "cases": cases}


def run_step_time(plan: Plan, out: Path, device: str, memory: bool) -> dict:
    from bench import step_time

    path = out / "step_time.json"
    argv = ["--device", device, "--clip_model", plan.clip_model, "--batch_size", str(plan.batch_size),
            "--steps", str(plan.steps), "--warmup", str(plan.warmup), "--num_classes", str(plan.num_classes),
            "--amp" if device == "cuda" else "--no-amp", "--json", str(path)]
    argv += ["--memory", "--memory_kinds", ",".join(KINDS)] if memory else ["--no-memory"]
    step_time.main(argv)
    raw = json.loads(path.read_text())
    memory_mib = raw.get("peak_memory_mib", {})
    kinds = {}
    for kind in KINDS:
        row, optimised = raw[kind], raw[kind]["optimised"]
        kinds[kind] = {
            "images_per_s": optimised["images_per_s"], "seconds_per_step": optimised["seconds"],
            "images_per_step": plan.batch_size * (1 if kind == "eval" else 2),
            "gflops_per_image": optimised.get("gflops_per_image"),
            "tflops_per_s": (optimised["gflops_per_image"] * optimised["images_per_s"] / 1e3
                             if "gflops_per_image" in optimised else None),
            "peak_memory_mib": memory_mib.get(kind, {}).get("optimised"),
            "straightforward_images_per_s": row["straightforward"]["images_per_s"],
            "straightforward_peak_memory_mib": memory_mib.get(kind, {}).get("straightforward"),
            "speedup": row["speedup"], "flop_ratio": row.get("flop_ratio"),
            "step_over_model_work": row["step_over_model_work"]}
    return {"command": "python bench/step_time.py " + " ".join(argv), "clip_model": plan.clip_model,
            "batch_size": plan.batch_size, "amp": device == "cuda", "machine": raw["machine"],
            "memory_unit": ("CUDA max_memory_allocated" if device == "cuda" else "peak RSS above start"),
            "kinds": kinds}


def run_eval_cache(plan: Plan, out: Path, device: str, cache_gb: float) -> dict:
    from bench import eval_cache
    from config import vision_depth

    path = out / "eval_cache.json"
    argv = ["--device", device, "--clip_model", plan.clip_model, "--images", str(plan.eval_images),
            "--batch_size", str(plan.eval_batch), "--grad_from_block", str(vision_depth(plan.clip_model) - 1),
            "--num_classes", str(plan.num_classes), "--repeats", str(plan.eval_repeats), "--cache_gb", str(cache_gb),
            "--amp" if device == "cuda" else "--no-amp", "--json", str(path)]
    eval_cache.main(argv)
    raw = json.loads(path.read_text())
    images = plan.eval_images
    return {"command": "python bench/eval_cache.py " + " ".join(argv), "images": images,
            "batch_size": plan.eval_batch, "first_evaluation_s": raw["first_evaluation_s"],
            "uncached_s": raw["eval_uncached_s"], "cached_s": raw["eval_cached_s"],
            "uncached_images_per_s": images / raw["eval_uncached_s"],
            "cached_images_per_s": images / raw["eval_cached_s"], "speedup": raw["speedup"],
            "cache_gib": raw["cache_gib"], "cache_device": raw.get("cache_device"),
            "cached_images": raw.get("cached_images"),
            "bytes_per_image": raw["cache_gib"] * 2**30 / max(raw.get("cached_images") or images, 1)}


def run_data_loading(plan: Plan, out: Path, workers: tuple[int, ...]) -> dict:
    from bench import data_loading

    path = out / "data_loading.json"
    argv = ["--images", str(plan.loading_images), "--width", str(plan.loading_size[0]),
            "--height", str(plan.loading_size[1]), "--image_size", str(plan.loading_image_size),
            "--batch_size", str(plan.loading_batch), "--workers", *map(str, workers),
            "--repeats", str(plan.loading_repeats), "--json_rows", str(path)]
    threads = torch.get_num_threads()
    try:
        data_loading.main(argv)
    finally:
        torch.set_num_threads(threads)  # data_loading runs torch on one thread, as a loader worker
    return {"command": "python bench/data_loading.py " + " ".join(argv), **json.loads(path.read_text())}


def run_kmeans(plan: Plan, out: Path, device: str) -> dict:
    from bench import estimate_k

    path = out / "kmeans.json"
    argv = ["--device", device, "--sizes", ",".join(map(str, plan.kmeans_sizes)),
            "--ks", ",".join(map(str, plan.kmeans_ks)), "--repeats", str(plan.kmeans_repeats),
            "--sklearn_budget", f"{plan.kmeans_sklearn_budget:g}", "--json", str(path)]
    return {"command": "python bench/estimate_k.py " + " ".join(argv), **estimate_k.main(argv)}


def run_demo(plan: Plan, out: Path, device: str) -> dict:
    import train
    from bench.demo_seeds import demo_flags

    root = out / "demo"
    flags = [*demo_flags(), "--device", device, *plan.demo_extra, "--exp_root", str(root), "--exp_name", "demo",
             "--no-progress"]
    start = time.perf_counter()
    metrics = train.main(flags)
    seconds = time.perf_counter() - start
    run_dirs = sorted((root / "digits").glob("demo-*"))
    keep = {key: value for key, value in metrics.items()
            if re.fullmatch(r"(train_unlabelled|test)/(visual|text|fused)/(all|old|new)", key)}
    return {"command": "python train.py " + " ".join(flags[:flags.index("--exp_root")]), "seconds": seconds,
            "metrics": keep, "run_dir": str(run_dirs[-1]) if run_dirs else None}


# ----------------------------------------------------------------------------- what the rates imply
def schedule_defaults() -> dict:
    """The paper's schedule as train.py's defaults give it."""
    from params import get_args_parser

    parser = get_args_parser()
    return {name: parser.get_default(name) for name in ("tes_epochs", "epochs", "batch_size", "eval_cache_gb")}


def schedule_estimates(step: dict, cache: dict | None, schedule: dict) -> dict:
    """Expected seconds of each dataset's full schedule at the measured rates: both stages train
    ⌊N / batch⌋ steps of ``batch`` samples, two views each, per epoch, and every stage-2 epoch
    evaluates the unlabelled training images (the test split's one final evaluation is left out).

    ``eval_s`` computes every evaluation in full (step_time's evaluation rate; --eval_cache_gb 0);
    ``eval_cached_s`` has train.py's default cache: the first evaluation in full, every later one
    reads the cached images (eval_cache's cached rate) and computes the rest in full.
    """
    rates = {kind: step["kinds"][kind]["images_per_s"] for kind in KINDS}
    batch, epochs1, epochs2 = schedule["batch_size"], schedule["tes_epochs"], schedule["epochs"]
    capacity = (int(schedule["eval_cache_gb"] * 2**30 // cache["bytes_per_image"])
                if cache and cache.get("bytes_per_image") else None)
    rows = {}
    for name, (train_images, unlabelled) in DATASETS.items():
        steps = train_images // batch
        images_per_epoch = 2 * batch * steps
        row = {"train_images": train_images, "unlabelled_images": unlabelled, "steps_per_epoch": steps,
               "stage1_images": epochs1 * images_per_epoch, "stage2_images": epochs2 * images_per_epoch,
               "eval_images": epochs2 * unlabelled}
        row["stage1_s"] = row["stage1_images"] / rates["stage1"]
        row["stage2_s"] = row["stage2_images"] / rates["stage2"]
        row["eval_s"] = row["eval_images"] / rates["eval"]
        row["total_s"] = row["stage1_s"] + row["stage2_s"] + row["eval_s"]
        if capacity is not None:
            cached = min(unlabelled, capacity)
            later = cached / cache["cached_images_per_s"] + (unlabelled - cached) / rates["eval"]
            row["cached_images"] = cached
            row["eval_cached_s"] = unlabelled / rates["eval"] + (epochs2 - 1) * later
            row["total_cached_s"] = row["stage1_s"] + row["stage2_s"] + row["eval_cached_s"]
        rows[name] = row
    return {"schedule": schedule, "rates_images_per_s": rates,
            "cached_eval_images_per_s": cache["cached_images_per_s"] if cache else None,
            "eval_cache_capacity_images": capacity, "sizes_source": SIZES_SOURCE, "datasets": rows}


def loader_workers(step: dict, loading: dict) -> dict:
    """Loader workers that keep each training stage fed: ⌈S / R⌉, S the step's samples/s (its
    images/s ÷ 2 views) and R one loader process's samples/s, measured with the most workers
    (the busiest, most realistic figure), without and with --image_cache."""
    rows = loading["rows"]
    basis = max(rows, key=lambda r: r["workers"])
    per_process = {"uncached": basis["per_process_uncached_samples_per_s"],
                   "cached": basis["per_process_cached_samples_per_s"]}
    stages = {}
    for kind in ("stage1", "stage2"):
        demand = step["kinds"][kind]["images_per_s"] / 2
        stages[kind] = {"step_samples_per_s": demand,
                        **{path: math.ceil(demand / rate) for path, rate in per_process.items()},
                        "measured_feeds": {path: [r["workers"] for r in rows
                                                  if r[f"loader_{path}_samples_per_s"] >= demand]
                                           for path in per_process}}
    return {"per_process_samples_per_s": per_process, "from_workers": basis["workers"],
            "cpu_cores": os.cpu_count(), "stages": stages}


# ----------------------------------------------------------------------------- the report
def hours(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def fmt(value, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def attention_summary(report: dict) -> list[str]:
    lines = []
    for model, parts in report.get("attention", {}).items():
        described = []
        for part, found in parts.items():
            if not isinstance(found, dict) or "forward" not in found:
                continue
            fwd = ", ".join(f"{k} ×{v}" for k, v in found["forward"].items()) or "none found"
            bwd = ", ".join(f"{k} ×{v}" for k, v in found.get("backward", {}).items())
            described.append(f"{part}: {fwd}" + (f" (backward {bwd})" if bwd else ""))
        lines.append(f"* {model}: " + "; ".join(described))
    return lines


def findings(report: dict) -> list[str]:
    """The CUDA tier's findings (tests/test_gpu.py's report file) as Markdown bullets."""
    lines = []
    precision = report.get("precision_stage2")
    if precision:
        errors, tf32 = precision.get("errors_against_float64", {}), precision.get("tf32", {})
        heads = max((v for k, v in errors.items() if "logits" not in k), default=None)
        logits = max((v for k, v in errors.items() if "logits" in k), default=None)
        lines.append(f"* Precision: CLIP's encoders and the TES in {precision.get('encoder_outputs')}, the text map and "
                     f"heads in {precision.get('text_map_head_outputs')}; against float64: text map and head outputs "
                     f"{fmt(heads, '.1e')} (relative), cosine logits {fmt(logits, '.1e')}, losses "
                     f"{fmt(max(precision.get('loss_errors', {}).values(), default=None), '.1e')}, fused prediction "
                     f"{fmt(precision.get('fused_error'), '.1e')}; matmul TF32 {tf32.get('matmul.allow_tf32')}, "
                     f"float32 matmul precision {tf32.get('float32_matmul_precision')}, cuDNN TF32 (convolutions: the "
                     f"patch embedding, under bf16) {tf32.get(next((k for k in tf32 if k.startswith('cudnn')), ''))}.")
    for mode in ("fp32", "bf16"):
        found = report.get(f"compile_{mode}")
        if found:
            own = (f"; bf16 autocast itself moves them {fmt(found.get('bf16_effect_on_loss'), '.1e')} / "
                   f"{fmt(found.get('bf16_effect_on_gradients'), '.1e')}" if mode == "bf16" else "")
            lines.append(f"* `--compile`, {mode}: compiled against eager, loss terms {fmt(found.get('max_loss_difference'), '.1e')}"
                         f", gradients {fmt(found.get('max_gradient_difference'), '.1e')} (tolerances "
                         f"{fmt(found.get('loss_tolerance'), '.1e')} / {fmt(found.get('gradient_tolerance'), '.1e')}{own}).")
    cache = report.get("eval_cache")
    if cache:
        lines.append("* Evaluation cache, predictions equal to the uncached path's: " + "; ".join(
            f"{name}: {row.get('images')} images in {row.get('device')} memory"
            + (", pinned" if row.get("pinned") else "") for name, row in cache.items()) + ".")
    demo = report.get("demo_short")
    if demo:
        lines.append(f"* Short demo (2 + 6 epochs) on CUDA, train_unlabelled All: visual "
                     f"{fmt(demo.get('train_unlabelled/visual/all'), '.4f')}, text {fmt(demo.get('train_unlabelled/text/all'), '.4f')}, "
                     f"fused {fmt(demo.get('train_unlabelled/fused/all'), '.4f')} (chance {fmt(demo.get('chance'), '.3f')}).")
    return lines


def markdown(result: dict) -> str:
    card, info = result["card"], result["machine"]
    cuda = result["device"] == "cuda"
    head = (f"### GPU: {card} (CUDA {info.get('cuda')}, {info.get('gpu_memory_gib')} GiB), torch {info['torch']}, "
            f"{info['cpu_cores']} CPU cores" if cuda else
            f"### CPU mode of the GPU check: {info['processor']}, {info['cpu_cores']} cores, torch {info['torch']}")
    lines = [head, "", f"`{result['command']}` ({result['started']}; the check took "
             f"{result['seconds'] / 60:.1f} min). Steps: "
             + ", ".join(f"{name} {'ok' if s['ok'] else 'FAILED'} ({s['seconds']:.0f} s)" if s.get("ran") else
                         f"{name} {'left out' if s.get('error') else 'skipped'}" for name, s in result["steps"].items())
             + "."]
    lines += [f"* {name}: {s['error']}" for name, s in result["steps"].items() if s.get("error")]
    lines.append("")
    tests = result.get("tests")
    if tests:
        lines += [f"**CUDA tests** (`{tests['command']}`): {tests['passed']} passed, {tests['failed']} failed, "
                  f"{tests['errors']} errors, {tests['skipped']} skipped of {tests['collected']} "
                  f"({tests['seconds']:.0f} s)."]
        skipped = sorted({c["message"] for c in tests["cases"] if c["outcome"] == "skipped"})
        if skipped:
            lines.append("Skipped: " + "; ".join(skipped) + ".")
        failed = [c for c in tests["cases"] if c["outcome"] in ("failed", "error")]
        lines += [f"* FAILED `{c['name']}`: {c['message'][:300]}" for c in failed]
        report = tests.get("report", {})
        if report.get("attention"):
            lines += ["", "Attention kernels (scaled_dot_product_attention, from the profiler, calls per kernel):",
                      *attention_summary(report)]
        lines += findings(report)
        lines.append("")
    step = result.get("step_time")
    if step:
        lines += [f"**Step time** (`{step['command']}`; {step['clip_model']}, random weights, batch "
                  f"{step['batch_size']} samples: {2 * step['batch_size']} images per training step, "
                  f"{step['batch_size']} per evaluation step; peak memory: {step['memory_unit']}, a fresh process "
                  "per step):", "",
                  "| step | images/s | s/step | GFLOP/image | achieved TFLOP/s | peak memory (MiB) | "
                  "reference's computation: images/s | its peak memory (MiB) | speed-up |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for kind, row in step["kinds"].items():
            lines.append(f"| {kind} | {row['images_per_s']:.1f} | {row['seconds_per_step']:.4f} | "
                         f"{fmt(row['gflops_per_image'], '.2f')} | {fmt(row['tflops_per_s'], '.1f')} | "
                         f"{fmt(row['peak_memory_mib'], '.0f')} | {row['straightforward_images_per_s']:.1f} | "
                         f"{fmt(row['straightforward_peak_memory_mib'], '.0f')} | {row['speedup']:.2f}× |")
        lines.append("")
    cache = result.get("eval_cache")
    if cache:
        lines += [f"**Evaluation cache** (`{cache['command']}`):", "",
                  "| images | uncached s | cached s | uncached images/s | cached images/s | speed-up | cache | in |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|",
                  f"| {cache['images']} | {cache['uncached_s']:.3f} | {cache['cached_s']:.3f} | "
                  f"{cache['uncached_images_per_s']:.1f} | {cache['cached_images_per_s']:.1f} | "
                  f"**{cache['speedup']:.2f}×** | {cache['cache_gib']:.3f} GiB | {cache['cache_device']} memory |", ""]
    loading = result.get("data_loading")
    if loading:
        lines += [f"**Input pipeline** (`{loading['command']}`; samples/s, two {loading['image_size']} px views "
                  "each):", "",
                  "| workers | uncached | cached | per process: uncached | cached | speed-up |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['workers']} | {r['loader_uncached_samples_per_s']:.1f} | {r['loader_cached_samples_per_s']:.1f}"
                  f" | {r['per_process_uncached_samples_per_s']:.1f} | {r['per_process_cached_samples_per_s']:.1f} | "
                  f"{r['speedup']:.2f}× |" for r in loading["rows"]]
        lines.append("")
    feed = result.get("loader_workers")
    if feed:
        rate = feed["per_process_samples_per_s"]
        lines += [f"**Loader workers that keep the GPU fed**: ⌈step samples/s ÷ one loader process's samples/s⌉, "
                  f"the step's samples/s being its images/s ÷ 2 views and a process's rate the one measured with "
                  f"{feed['from_workers']} workers ({rate['uncached']:.1f} uncached, {rate['cached']:.1f} cached); "
                  f"this machine has {feed['cpu_cores']} CPU cores:", "",
                  "| stage | step samples/s | workers | workers with `--image_cache` | measured worker counts that keep up"
                  " (uncached / cached) |",
                  "|---|---:|---:|---:|---|"]
        for kind, row in feed["stages"].items():
            fed = row["measured_feeds"]
            lines.append(f"| {kind} | {row['step_samples_per_s']:.1f} | {row['uncached']} | {row['cached']} | "
                         f"{', '.join(map(str, fed['uncached'])) or 'none'} / "
                         f"{', '.join(map(str, fed['cached'])) or 'none'} |")
        lines.append("")
    lines += kmeans_markdown(result.get("kmeans"))
    demo = result.get("demo")
    if demo:
        m = demo["metrics"]

        def aon(split: str, head: str) -> str:
            return "/".join(fmt(m.get(f"{split}/{head}/{g}"), ".4f") for g in ("all", "old", "new"))

        lines += [f"**Demo** (`{demo['command']}`): {demo['seconds']:.0f} s; All/Old/New on train_unlabelled: "
                  f"visual {aon('train_unlabelled', 'visual')}, text {aon('train_unlabelled', 'text')}, "
                  f"fused {aon('train_unlabelled', 'fused')}; test: visual {aon('test', 'visual')}.", ""]
    est = result.get("schedule")
    if est:
        s = est["schedule"]
        r = est["rates_images_per_s"]
        cached_rate = est.get("cached_eval_images_per_s")
        lines += [f"**Expected wall time of the paper's schedule on this card**, from the rates above: "
                  f"{s['tes_epochs']} stage-1 + {s['epochs']} stage-2 epochs of ⌊N / {s['batch_size']}⌋ steps of "
                  f"{s['batch_size']} samples (two views each) at {r['stage1']:.1f} and {r['stage2']:.1f} images/s, "
                  f"and one evaluation of the unlabelled training images per stage-2 epoch at {r['eval']:.1f} images/s"
                  + (f" (with train.py's default cache, --eval_cache_gb {s['eval_cache_gb']:g}: the first in full, "
                     f"later ones read up to {est['eval_cache_capacity_images']:,} cached images at "
                     f"{cached_rate:.1f} images/s)" if cached_rate else "")
                  + "; the loader assumed to keep up (above), the test split's final evaluation and the "
                  f"checkpoints left out. Dataset sizes: {est['sizes_source']}.", "",
                  "| dataset | training images | unlabelled | steps/epoch | stage 1 | stage 2 | evaluations | total | "
                  "evaluations, cached | total, cached |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in est["datasets"].items():
            lines.append(f"| {name} | {row['train_images']:,} | {row['unlabelled_images']:,} | {row['steps_per_epoch']:,}"
                         f" | {hours(row['stage1_s'])} | {hours(row['stage2_s'])} | {hours(row['eval_s'])} | "
                         f"**{hours(row['total_s'])}** | {hours(row.get('eval_cached_s'))} | "
                         f"**{hours(row.get('total_cached_s'))}** |")
        lines.append("")
    return "\n".join(lines) + "\n"


def kmeans_markdown(kmeans: dict | None) -> list[str]:
    """The K estimate's k-means: seconds per k-means of each path, and the ImageNet-1K-sized search."""
    if not kmeans:
        return []
    from bench.estimate_k import table_lines

    search = kmeans["imagenet_1k"]
    paths = [f"{path} {hours(search[path]['seconds'])} (from the {search[path]['from_cell'][0]:,} x "
             f"{search[path]['from_cell'][1]:,} cell)" for path in ("torch", "sklearn") if path in search]
    return [f"**The K estimate's k-means** (`{kmeans['command']}`; {kmeans['machine']}; torch on the check's "
            "device, scikit-learn on the CPU):", "", *table_lines(kmeans["cells"], kmeans["args"]["sklearn_budget"]),
            "", f"ImageNet-1K-sized estimate ({len(search['ks'])} values of k, sum {search['sum_k']:,}, each a "
            f"k-means of {search['n']:,} points, in proportion to N x k): " + "; ".join(paths) + ".", ""]


def print_estimates(result: dict) -> None:
    est, feed = result.get("schedule"), result.get("loader_workers")
    if est:
        print(f"\nexpected wall time of the paper's schedule on {result['card']} (stage 1 + stage 2 + evaluations; "
              "with the default evaluation cache):")
        for name, row in est["datasets"].items():
            print(f"  {name:<13} {hours(row['total_s']):>10}  ({hours(row['stage1_s'])} + {hours(row['stage2_s'])} + "
                  f"{hours(row['eval_s'])}; cached evaluations: {hours(row.get('total_cached_s'))})")
    if feed:
        for kind, row in feed["stages"].items():
            print(f"  {kind}: {row['step_samples_per_s']:.1f} samples/s need {row['uncached']} loader workers, "
                  f"{row['cached']} with --image_cache")


def write_outputs(result: dict, out: Path) -> tuple[Path, Path]:
    stem = f"gpu_check-{card_slug(result['card'])}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


# ----------------------------------------------------------------------------- main
def derive(result: dict, schedule: dict) -> None:
    """The schedule estimates and the loader workers, from the rates measured so far."""
    if "step_time" in result:
        result["schedule"] = schedule_estimates(result["step_time"], result.get("eval_cache"), schedule)
        if "data_loading" in result:
            result["loader_workers"] = loader_workers(result["step_time"], result["data_loading"])


def main(argv: list[str] | None = None) -> dict:
    args = get_args(argv)
    device, plan = args.device, PLANS[args.device]
    memory = plan.memory if args.memory is None else args.memory
    workers = tuple(args.workers) if args.workers else plan.loading_workers
    out = args.out.resolve()  # the tests run in a process of their own, from the repository
    out.mkdir(parents=True, exist_ok=True)
    shown = ["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]
    start = time.perf_counter()
    result = {"card": card_name(device), "device": device, "mode": "gpu" if device == "cuda" else "cpu",
              "command": " ".join(shown), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "seconds": 0.0, "machine": machine_info(device), "plan": asdict(plan), "steps": {}}
    schedule = schedule_defaults()
    runners = {
        "tests": lambda: run_tests(plan, out, device),
        "step_time": lambda: run_step_time(plan, out, device, memory),
        "eval_cache": lambda: run_eval_cache(plan, out, device, schedule["eval_cache_gb"]),
        "data_loading": lambda: run_data_loading(plan, out, workers),
        "kmeans": lambda: run_kmeans(plan, out, device),
        "demo": lambda: run_demo(plan, out, device),
    }
    for name in STEPS:
        # A step left out with --skip is not a failure; one left out for time is.
        record = result["steps"][name] = {"ran": name not in args.skipped, "ok": True, "seconds": 0.0}
        elapsed, expected = time.perf_counter() - start, (plan.expected_s or {}).get(name, 0)
        if record["ran"] and args.max_minutes and plan.expected_s and elapsed + expected > 60 * args.max_minutes:
            record.update(ran=False, ok=False, error=f"left out: {elapsed:.0f} s gone, about {expected} s more would "
                                                     f"pass --max_minutes {args.max_minutes:g}")
            print(f"[gpu_check] {name} {record['error']}", flush=True)
        if not record["ran"]:
            continue
        print(f"\n[gpu_check] {name}", flush=True)
        step_start = time.perf_counter()
        try:
            result[name] = runners[name]()
        except Exception as err:  # a failing step is recorded; the others still run
            record["ok"], record["error"] = False, f"{type(err).__name__}: {err}"
            print(f"[gpu_check] {name} failed: {record['error']}", flush=True)
        record["seconds"] = time.perf_counter() - step_start
        if name == "tests" and name in result:
            tests = result[name]
            record["ok"] = not (tests["timed_out"] or tests["failed"] or tests["errors"] or tests["collected"] == 0
                                or tests["returncode"] not in (0, 5))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # what a step left cached counts as used in the next one's free memory
        derive(result, schedule)
        result["seconds"] = time.perf_counter() - start
        write_outputs(result, out)
    derive(result, schedule)
    result["ok"] = all(step["ok"] for step in result["steps"].values())
    result["seconds"] = time.perf_counter() - start
    json_path, md_path = write_outputs(result, out)
    print_estimates(result)
    print(f"\n[gpu_check] {'no step failed' if result['ok'] else 'SOME STEPS FAILED'} in {result['seconds']:.0f} s; "
          f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
