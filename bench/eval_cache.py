"""Seconds per stage-2 evaluation after the first: with the evaluation cache (the frozen blocks'
and the TES's outputs kept from the first evaluation) against without, in one run, on the real
ViT-B/16 architecture (random weights: the weights do not change the work).

    python bench/eval_cache.py                          # CPU defaults: about 2 minutes on 2 cores
    python bench/eval_cache.py --device cuda --images 2048 --batch_size 256 --amp
    python bench/eval_cache.py --json eval_cache.json
    python bench/eval_cache.py --device cuda --amp --cache_gb 8     # train.py's default budget (on the GPU)

Both paths run evaluation.predict.predict_split on the same loader; the images are in memory, so the
uncached figure does not even include JPEG decoding. The ratio's ceiling is the share of the
evaluation FLOPs in the frozen blocks and the TES (about 15x at grad_from_block 11).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.step_time import machine, timed  # noqa: E402
from backbone import load_clip  # noqa: E402
from config import vision_image_size  # noqa: E402
from data.samplers import ShardSampler  # noqa: E402
from evaluation.cache import EvalCache  # noqa: E402
from evaluation.predict import predict_split  # noqa: E402
from model import GETModel, TextEmbeddingSynthesizer  # noqa: E402
from util.dist import DistInfo  # noqa: E402


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clip_model", default="ViT-B-16")
    p.add_argument("--images", type=int, default=32, help="images in the evaluated split")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--grad_from_block", type=int, default=11)
    p.add_argument("--num_classes", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="timed evaluations after the first (median)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--cache_gb", type=float, default=None,
                   help="the cache's budget in GiB, as train.py's --eval_cache_gb (default 1024: everything, "
                        "in host memory on a GPU, whose half is less); with it the JSON names where the cache was")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    clip = load_clip(args.clip_model, None, device=device)
    net = GETModel(clip, TextEmbeddingSynthesizer(clip), args.num_classes, args.grad_from_block,
                   amp=args.amp).eval()
    size = vision_image_size(args.clip_model)
    data = TensorDataset(torch.randn(args.images, 3, size, size), torch.zeros(args.images, dtype=torch.long),
                         torch.arange(args.images))
    loader = DataLoader(data, batch_size=args.batch_size, sampler=ShardSampler(args.images),
                        pin_memory=device.type == "cuda")
    budget = 2**40 if args.cache_gb is None else int(args.cache_gb * 2**30)
    cache, info = EvalCache("bench", budget), DistInfo()
    first = timed(lambda: predict_split(net, loader, device, info, cache), device)  # builds the cache
    times = {"uncached": [], "cached": []}
    for _ in range(args.repeats):  # alternate, so that drifts of the machine hit both alike
        times["uncached"].append(timed(lambda: predict_split(net, loader, device, info), device))
        times["cached"].append(timed(lambda: predict_split(net, loader, device, info, cache), device))
    uncached, cached = (statistics.median(times[k]) for k in ("uncached", "cached"))
    result = {"machine": machine(device),
              "args": {k: v for k, v in vars(args).items() if k != "cache_gb" or v is not None}, "first_evaluation_s": first,
              "eval_uncached_s": uncached, "eval_cached_s": cached, "speedup": uncached / cached,
              "cache_gib": cache.size / 2**30, "all_seconds": times}
    if args.cache_gb is not None:
        result["cache_device"] = str(cache.device)
        result["cached_images"] = sum(len(batch[1]) for batch in cache.batches)
    print(f"{args.images} images, batch {args.batch_size}, {result['machine']}")
    print(f"first evaluation (builds the cache): {first:.3f} s")
    print(f"{'evaluation':<12}{'median s':>10}{'images/s':>10}")
    for name, seconds in (("uncached", uncached), ("cached", cached)):
        print(f"{name:<12}{seconds:>10.3f}{args.images / seconds:>10.1f}")
    print(f"speed-up {result['speedup']:.2f}x; cache {result['cache_gib']:.3f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
