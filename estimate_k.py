"""Estimate the number of classes K of a dataset, as ``train.py --num_classes auto`` does before
training (the method of GCD, Vaze et al. 2022: k-means of the frozen CLIP features of all
training images, scored on the labelled ones, Brent's search of k; evaluation/k_estimate.py):

    python estimate_k.py --dataset_name folder --data_root DIR --out k.json
    python estimate_k.py --dataset_name cub --max_classes 400
    python estimate_k.py --dataset_name digits --clip_model GET-tiny --pretrained none --device cpu --num_workers 0

It takes train.py's flags (those that matter: the data, --old_classes, --max_classes, the
CLIP model, --device, --amp, --batch_size, --num_workers, --seed) and ``--out FILE``, which
also writes the estimate and the accuracy-vs-k curve as JSON. Prints both and returns the
estimate; the same flags give train.py's estimate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from backbone import build_clip
from data.task import task_from_args
from errors import USER_ERRORS
from evaluation.k_estimate import KEstimate, estimate_k, format_estimate
from params import get_args_parser, parse_args
from util.dist import cleanup_distributed, init_distributed
from util.io import save_json
from util.logging_utils import get_logger, setup_logging


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        parents=[get_args_parser()], add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Estimate K, the number of classes, from the frozen CLIP features (GCD's method).")
    parser.add_argument("--out", default=None, help="also write the estimate and the curve to this JSON file")
    # Stage 2's trainable blocks do not matter here; 0 is valid for every CLIP.
    parser.set_defaults(grad_from_block=0)
    return parser


def main(argv: list[str] | None = None) -> KEstimate:
    args = parse_args(argv, get_parser())
    info = init_distributed(args.device)
    setup_logging(None, info.is_main)
    try:
        task, device = task_from_args(args), torch.device(info.device(args.device))
        estimate = estimate_k(build_clip(args, device), task, args, device, info)
        get_logger().info("%s", format_estimate(estimate, task.num_labeled_classes))
        if args.out and info.is_main:
            save_json(estimate.record(), Path(args.out))
            get_logger().info("written to %s", args.out)
        return estimate
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
