"""Seconds per k-means of the K estimate (``n_init`` = evaluation.k_estimate.KMEANS_INITS
restarts, k-means++ seeding, the best inertia kept): the torch k-means that the estimate runs
(evaluation/kmeans.py) against scikit-learn's KMeans, which it ran before, in one run, on
CLIP-like features; then what an ImageNet-1K-sized estimate would take.

    python bench/estimate_k.py                          # 10k and 100k points, k = 100 and 1,000
    python bench/estimate_k.py --large                  # also 1M points (slow on a CPU)
    python bench/estimate_k.py --device cuda --large    # the torch k-means on the GPU
    python bench/estimate_k.py --threads 1 --json estimate_k.json

The features: 512-d, L2-normalised, 1,000 classes in 100 superclasses (each row's cosine to
its class mean about 0.64), so k-means has structure to find, as in CLIP's. Each cell is the
median of ``--repeats`` k-means with the same seed, torch and scikit-learn alternating so
that a drift of a shared machine hits both. A scikit-learn cell predicted (from its smaller
cell, in proportion to N x k) to take more than ``--sklearn_budget`` seconds per k-means is
skipped, and the table says so (on a shared machine a small cell slowed by other jobs can
overpredict: ``--sizes 100000 --ks 1000 --repeats 1 --sklearn_budget 1e9`` measures one cell
anyway). Both paths take float32 and the same number of threads (``--threads``; default:
torch's and scikit-learn's own, all cores).

The extrapolation assumes that a k-means costs in proportion to N x k, which the table's
"ns / (N k)" column shows for the cells measured: k-means++ makes k passes over the N rows,
and each Lloyd iteration is an N x D by D x k product, the iterations to converge varying
little with N and k. An ImageNet-1K-sized estimate clusters N = 1.28M features for each k
that Brent's search evaluates in [K_old = 500, --max_classes], whose values are taken from
evaluation.k_estimate.brent_search itself on a curve that peaks at ``--true_k``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.step_time import timed  # noqa: E402
from evaluation.k_estimate import KMEANS_INITS, brent_search  # noqa: E402
from evaluation.kmeans import kmeans  # noqa: E402

DIM = 512
IMAGENET_N, IMAGENET_OLD = 1_281_167, 500


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="the torch k-means' device (scikit-learn runs on the CPU)")
    p.add_argument("--sizes", default="10000,100000", help="comma-separated numbers of points")
    p.add_argument("--large", action="store_true", help="also 1,000,000 points")
    p.add_argument("--ks", default="100,1000", help="comma-separated numbers of clusters")
    p.add_argument("--repeats", type=int, default=3, help="k-means per cell and path (median reported)")
    p.add_argument("--sklearn_budget", type=float, default=150.0,
                   help="skip a scikit-learn cell predicted to take longer than this (seconds per k-means)")
    p.add_argument("--threads", type=int, default=None, help="threads of both paths (default: their own)")
    p.add_argument("--max_classes", type=int, default=4 * IMAGENET_OLD,
                   help="the extrapolated search's upper end (train.py's default: 4 K_old)")
    p.add_argument("--true_k", type=int, default=1000, help="where the extrapolated search's curve peaks")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def clip_like_features(n: int, seed: int = 0, classes: int = 1000) -> torch.Tensor:
    """[n, 512] float32 L2-normalised rows of a mixture of ``classes`` classes, 10 to a
    superclass (classes of a superclass are closer to each other than to the others)."""
    g = torch.Generator().manual_seed(seed)
    supers = F.normalize(torch.randn(classes // 10, DIM, generator=g), dim=1).repeat_interleave(10, 0)
    means = F.normalize(supers + 0.8 * F.normalize(torch.randn(classes, DIM, generator=g), dim=1), dim=1)
    rows = means[torch.randint(classes, (n,), generator=g)]
    return F.normalize(rows.add_(torch.randn(n, DIM, generator=g), alpha=1.2 / DIM**0.5), dim=1)


def machine(device: torch.device, threads: int) -> str:
    """The CPU's model name (Linux) and threads; the GPU where the torch k-means runs on one."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    text = f"{cpu}, {os.cpu_count()} CPU cores, {threads} threads, torch {torch.__version__}"
    return f"{torch.cuda.get_device_name(device)}; {text}" if device.type == "cuda" else text


def measure_cell(x_cpu: torch.Tensor, x_dev: torch.Tensor, k: int, device: torch.device, repeats: int,
                 sklearn_predicted: float | None, budget: float) -> dict:
    """Seconds of each path's k-means of the rows into k clusters, ``repeats`` times, alternating."""
    run_sklearn = sklearn_predicted is None or sklearn_predicted <= budget
    times = {"torch": [], "sklearn": []}
    out = {}
    for _ in range(repeats):
        times["torch"].append(timed(lambda: out.update(torch=kmeans(x_dev, k, n_init=KMEANS_INITS, seed=0)), device))
        if run_sklearn:
            model = KMeans(n_clusters=k, n_init=KMEANS_INITS, random_state=0)
            times["sklearn"].append(timed(lambda: model.fit(x_cpu.numpy()), torch.device("cpu")))
            out["sklearn"] = model
    cell = {"n": len(x_cpu), "k": k, "torch_s": statistics.median(times["torch"]),
            "torch_n_iter": out["torch"].n_iter, "torch_inertia": out["torch"].inertia, "all_seconds": times,
            "sklearn_s": None, "sklearn_predicted_s": sklearn_predicted}
    if run_sklearn:
        cell.update(sklearn_s=statistics.median(times["sklearn"]), sklearn_n_iter=int(out["sklearn"].n_iter_),
                    sklearn_inertia=float(out["sklearn"].inertia_))
    return cell


def table_lines(cells: list[dict], budget: float) -> list[str]:
    """The cells as a Markdown table (this script's output, and the GPU check's section)."""
    lines = ["| N | k | torch s | scikit-learn s | speed-up | torch ns / (N k) | scikit-learn ns / (N k) "
             "| inertia torch / scikit-learn | Lloyd iterations torch / scikit-learn |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        per = lambda s: f"{s / (c['n'] * c['k']) * 1e9:.1f}"  # noqa: E731
        if c["sklearn_s"] is None:
            sk = f"left out (predicted {c['sklearn_predicted_s']:.0f} s > {budget:g} s)"
            rest = f"| – | {per(c['torch_s'])} | – | – | {c['torch_n_iter']} / – |"
        else:
            sk = f"{c['sklearn_s']:.2f}"
            rest = (f"| {c['sklearn_s'] / c['torch_s']:.1f}x | {per(c['torch_s'])} | {per(c['sklearn_s'])} "
                    f"| {c['torch_inertia'] / c['sklearn_inertia']:.4f} "
                    f"| {c['torch_n_iter']} / {c['sklearn_n_iter']} |")
        lines.append(f"| {c['n']:,} | {c['k']:,} | {c['torch_s']:.2f} | {sk} " + rest)
    return lines


def imagenet_search(max_classes: int, true_k: int) -> list[int]:
    """The k that Brent's search of the K estimate evaluates in [500, max_classes] on a
    labelled-accuracy curve that peaks at ``true_k`` (the real curve's shape changes the
    values little: the search narrows a bracket around the peak)."""
    _, curve = brent_search(lambda k: -abs(k - true_k) / true_k, IMAGENET_OLD, max_classes)
    return list(curve)


def extrapolate(cells: list[dict], ks: list[int], max_classes: int, true_k: int, device: torch.device) -> dict:
    """Seconds of the whole ImageNet-1K-sized search for each path, from its largest measured
    cell's seconds per N x k."""
    result = {"n": IMAGENET_N, "ks": ks, "sum_k": sum(ks)}
    for path in ("torch", "sklearn"):
        measured = [c for c in cells if c[f"{path}_s"] is not None]
        if measured:
            largest = max(measured, key=lambda c: c["n"] * c["k"])
            per = largest[f"{path}_s"] / (largest["n"] * largest["k"])
            result[path] = {"seconds": per * IMAGENET_N * sum(ks), "from_cell": [largest["n"], largest["k"]]}
    print(f"\nImageNet-1K-sized estimate: {len(ks)} values of k evaluated by Brent's search in "
          f"[{IMAGENET_OLD}, {max_classes}] on a curve peaking at {true_k} (k = {', '.join(map(str, sorted(ks)))}), "
          f"each a k-means of {IMAGENET_N:,} points; time in proportion to N x k (the assumption: see the "
          "ns / (N k) column):")
    for path, where in (("torch", device.type), ("sklearn", "cpu")):
        if path in result:
            n, k = result[path]["from_cell"]
            seconds = result[path]["seconds"]
            print(f"    {path:<8} ({where}, from the {n:,} x {k:,} cell): "
                  f"{seconds / 3600:.2f} h ({seconds / 60:.1f} min)")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = get_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    sizes = [int(s) for s in args.sizes.split(",")] + ([1_000_000] if args.large else [])
    ks = [int(k) for k in args.ks.split(",")]
    print(f"k-means with {KMEANS_INITS} restarts, {DIM}-d CLIP-like features; torch on {device}, "
          f"scikit-learn on the CPU; {machine(device, threads)}; median of {args.repeats}")
    with threadpool_limits(limits=args.threads):  # None: scikit-learn's own thread counts
        kmeans(clip_like_features(2000, seed=1).to(device), 10)  # warm-up: first-call costs of the kernels
        cells, sklearn_per = [], None  # seconds per N x k of scikit-learn's last cell, for the prediction
        for n in sorted(sizes):
            x_cpu = clip_like_features(n)
            x_dev = x_cpu.to(device)
            for k in sorted(ks):
                predicted = None if sklearn_per is None else sklearn_per * n * k
                cell = measure_cell(x_cpu, x_dev, k, device, args.repeats, predicted, args.sklearn_budget)
                if cell["sklearn_s"] is not None:
                    sklearn_per = cell["sklearn_s"] / (n * k)
                cells.append(cell)
                print(f"  {n:>9,} x {k:>5,}: torch {cell['torch_s']:.2f} s, scikit-learn "
                      + (f"{cell['sklearn_s']:.2f} s" if cell["sklearn_s"] is not None else "skipped"), flush=True)
            del x_cpu, x_dev
    print("\n" + "\n".join(table_lines(cells, args.sklearn_budget)))
    search = extrapolate(cells, imagenet_search(args.max_classes, args.true_k), args.max_classes, args.true_k, device)
    result = {"machine": machine(device, threads), "args": vars(args), "cells": cells, "imagenet_1k": search}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
