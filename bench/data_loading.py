"""Throughput of the training input pipeline on real-size JPEGs, with and without the image
cache (``--image_cache``), measured in one run: two views of the GET train transform per
sample, through a DataLoader, as the training loader yields them.

    python bench/data_loading.py                                # CPU defaults, about a minute
    python bench/data_loading.py --json loading.json            # also write the figures
    python bench/data_loading.py --workers 0 4 8 16 --step_samples_per_s 900
    python bench/data_loading.py --workers 0 4 8 16 --json_rows rows.json   # every worker count as JSON

uncached: decode the JPEG, convert to RGB, resize (int(224 / 0.875) = 256 px, bicubic), then
the random crop, flip, jitter, ToTensor and Normalize, twice. cached: the resized pixels come
from the memory-mapped cache (data/image_cache.py), then the same random steps. The cache is
built once before timing (its build time and size are printed). The two paths alternate,
pass by pass, and the median pass of each is reported. Samples/s per loader process is the
loader's samples/s divided by its worker processes (the main process when --workers 0); every
loader process runs torch on one thread, as DataLoader workers do. ``--json PATH`` writes
``{"uncached_samples_per_s", "cached_samples_per_s", "speedup", ...}`` for the first
``--workers`` value.

A fast GPU trains faster than a few cores can decode: compare the samples/s here with the
stage-2 samples/s of bench/step_time.py on the training machine (``--step_samples_per_s``
prints how many workers keep up on each path). The images are synthetic but of ImageNet's
typical size and JPEG quality.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.augmentations import TwoViews, get_transforms, resize_step  # noqa: E402
from data.data_utils import GCDDataset, RawSplit  # noqa: E402
from data.image_cache import use_image_cache  # noqa: E402
from util.dist import DistInfo  # noqa: E402


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Smooth random images (so JPEG sizes are realistic, ~65 KB at 500x375), quality 90."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.BICUBIC)
        noise = rng.integers(-12, 13, (size[1], size[0], 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def training_datasets(paths: list[Path], image_size: int, cache_dir: Path) -> tuple[dict, float]:
    """{"uncached": ..., "cached": ...} GCDDatasets of the JPEGs with the two-view train
    transform, and the seconds the cache took to build."""
    raw = RawSplit("bench", [str(p) for p in paths], np.zeros(len(paths), dtype=np.int64))
    every = np.arange(len(raw))
    train_tf, _ = get_transforms(image_size=image_size)
    cached = GCDDataset(raw, every, {0: 0}, TwoViews(train_tf))
    start = time.perf_counter()
    use_image_cache(str(cache_dir), {"train": [cached]}, resize_step(image_size), DistInfo())
    build_s = time.perf_counter() - start
    return {"uncached": GCDDataset(raw, every, {0: 0}, TwoViews(train_tf)), "cached": cached}, build_s


def one_pass(loader: DataLoader) -> float:
    """Samples/s of one pass over ``loader``."""
    start = time.perf_counter()
    n = sum(len(uq_idx) for _, _, uq_idx in loader)
    return n / (time.perf_counter() - start)


def compare(datasets: dict, workers: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Median samples/s of each path's loader, the paths alternating pass by pass."""
    loaders = {name: DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                                persistent_workers=workers > 0) for name, dataset in datasets.items()}
    for loader in loaders.values():  # the first pass starts the workers: not timed
        one_pass(loader)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            rates[name].append(one_pass(loader))
    return {name: statistics.median(values) for name, values in rates.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=5, help="timed passes per path and worker count")
    p.add_argument("--step_samples_per_s", type=float, default=None,
                   help="stage-2 training samples/s measured by bench/step_time.py (images/s / 2)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the figures of the first --workers value as JSON")
    p.add_argument("--json_rows", type=Path, default=None, metavar="PATH",
                   help="write the figures of every --workers value as JSON (a list of rows: the loader's "
                        "samples/s and per process, uncached and cached)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        images, cache_dir = Path(tmp) / "images", Path(tmp) / "cache"
        images.mkdir()
        paths = write_jpegs(images, args.images, (args.width, args.height))
        kib = statistics.mean(q.stat().st_size for q in paths) / 1024
        datasets, build_s = training_datasets(paths, args.image_size, cache_dir)
        cache_mib = sum(f.stat().st_size for f in cache_dir.glob("*.u8")) / 2**20
        print(f"{args.images} JPEGs of {args.width}x{args.height} (mean {kib:.0f} KiB), "
              f"two {args.image_size}px views each, batch {args.batch_size}; cache built in "
              f"{build_s:.1f} s ({1000 * build_s / args.images:.2f} ms/image), {cache_mib:.1f} MiB")
        print(f"{'workers':>8}{'uncached/s':>12}{'cached/s':>10}{'per process: uncached':>23}"
              f"{'cached':>8}{'speed-up':>10}"
              + (f"{'workers to keep up: uncached':>30}{'cached':>8}" if args.step_samples_per_s else ""))
        figures, rows = None, []
        for workers in args.workers:
            rate = compare(datasets, workers, args.batch_size, args.repeats)
            per_process = {name: r / max(workers, 1) for name, r in rate.items()}
            speedup = rate["cached"] / rate["uncached"]
            line = (f"{workers:>8}{rate['uncached']:>12.1f}{rate['cached']:>10.1f}"
                    f"{per_process['uncached']:>23.1f}{per_process['cached']:>8.1f}{speedup:>9.2f}x")
            if args.step_samples_per_s:
                line += (f"{args.step_samples_per_s / per_process['uncached']:>30.1f}"
                         f"{args.step_samples_per_s / per_process['cached']:>8.1f}")
            print(line)
            rows.append({"workers": workers, "loader_uncached_samples_per_s": rate["uncached"],
                         "loader_cached_samples_per_s": rate["cached"],
                         "per_process_uncached_samples_per_s": per_process["uncached"],
                         "per_process_cached_samples_per_s": per_process["cached"], "speedup": speedup})
            if figures is None:
                figures = {"uncached_samples_per_s": round(per_process["uncached"], 1),
                           "cached_samples_per_s": round(per_process["cached"], 1),
                           "speedup": round(speedup, 2), "workers": workers, "images": args.images,
                           "width": args.width, "height": args.height, "image_size": args.image_size,
                           "cache_build_s_per_image": round(build_s / args.images, 5)}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.json_rows:
        shared = {"images": args.images, "width": args.width, "height": args.height, "image_size": args.image_size,
                  "batch_size": args.batch_size, "repeats": args.repeats, "jpeg_kib": kib,
                  "cache_build_s_per_image": build_s / args.images}
        args.json_rows.write_text(json.dumps({**shared, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json_rows}")


if __name__ == "__main__":
    main()
