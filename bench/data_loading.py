"""Throughput of the training input pipeline on real-size JPEGs: decode, the GET train
transform, two views per sample, through a DataLoader.

    python bench/data_loading.py                                # CPU defaults, about a minute
    python bench/data_loading.py --workers 0 4 8 16 --step_samples_per_s 900

A fast GPU trains faster than a few cores can decode: compare the samples/s here with the
stage-2 samples/s of bench/step_time.py on the training machine (``--step_samples_per_s``
prints the share of a step that loading would take without overlap, and how many workers
keep up). The images are synthetic but of ImageNet's typical size and JPEG quality.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.augmentations import TwoViews, get_transforms  # noqa: E402
from data.data_utils import load_image  # noqa: E402


class JpegFolder(Dataset):
    """Two augmented views of each JPEG, as the training loader yields them."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_image(self.paths[index], "bench")), index


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Smooth random images (so JPEG sizes are realistic, ~100 KB), quality 90."""
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


def samples_per_second(dataset: Dataset, workers: int, batch_size: int, repeats: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                        persistent_workers=workers > 0)
    rates = []
    for _ in range(repeats + 1):  # the first pass starts the workers: not timed
        start = time.perf_counter()
        n = sum(len(index) for _, index in loader)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step_samples_per_s", type=float, default=None,
                   help="stage-2 training samples/s measured by bench/step_time.py (images/s / 2)")
    args = p.parse_args()
    train_tf, _ = get_transforms(image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images, (args.width, args.height))
        kib = statistics.mean(q.stat().st_size for q in paths) / 1024
        dataset = JpegFolder(paths, TwoViews(train_tf))
        print(f"{args.images} JPEGs of {args.width}x{args.height} (mean {kib:.0f} KiB), "
              f"two {args.image_size}px views each, batch {args.batch_size}")
        print(f"{'workers':>8}{'samples/s':>11}{'ms/sample/worker':>18}"
              + (f"{'load share':>12}{'workers to keep up':>20}" if args.step_samples_per_s else ""))
        for workers in args.workers:
            rate = samples_per_second(dataset, workers, args.batch_size, args.repeats)
            per_worker = 1000 * max(workers, 1) / rate
            line = f"{workers:>8}{rate:>11.1f}{per_worker:>18.2f}"
            if args.step_samples_per_s:
                share = args.step_samples_per_s / (args.step_samples_per_s + rate)
                need = args.step_samples_per_s * per_worker / 1000
                line += f"{share:>12.0%}{need:>20.1f}"
            print(line)


if __name__ == "__main__":
    main()
