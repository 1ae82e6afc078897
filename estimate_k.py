"""Estimate the number of classes K of a dataset, as ``train.py --num_classes auto`` does before
training (the method of GCD, Vaze et al. 2022: k-means of the frozen CLIP features of all
training images, scored on the labelled ones, Brent's search of k; evaluation/k_estimate.py):

    python estimate_k.py --dataset_name folder --data_root DIR --out k.json
    python estimate_k.py --dataset_name cub --max_classes 400
    python estimate_k.py --dataset_name digits --clip_model GET-tiny --pretrained none --device cpu --num_workers 0

It takes train.py's flags (those that matter: the data, --old_classes, --max_classes, the
CLIP model, --device (the CLIP's and the k-means'), --amp, --batch_size, --num_workers, --seed,
--skip_bad_images) and ``--out FILE``, which
also writes the estimate and the accuracy-vs-k curve as JSON (its folder is made if missing;
checked, like every flag, before the search). Prints both and returns the
estimate; the same flags give train.py's estimate.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from backbone import build_clip
from data.data_utils import skipped_images
from data.task import check_max_classes, task_from_args
from errors import USER_ERRORS, InputError
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
        # Every input is checked before the search, which is the long part.
        task, device = task_from_args(args), torch.device(info.device(args.device))
        check_max_classes(args.max_classes, task)  # estimated here whatever --num_classes says
        out = prepare_out(args.out, info.is_main)
        estimate = estimate_with_skips(build_clip(args, device), task, args, device, info)
        get_logger().info("%s", format_estimate(estimate, task.num_labeled_classes))
        if out and info.is_main:
            save_json(estimate.record(), out)
            get_logger().info("written to %s", out)
        return estimate
    finally:
        cleanup_distributed()


def estimate_with_skips(clip, task, args, device, info) -> KEstimate:
    """``estimate_k``; with --skip_bad_images each unreadable image is replaced by the next one
    and named in the log at the end (there is no run folder to list them in)."""
    if not args.skip_bad_images:
        return estimate_k(clip, task, args, device, info)
    with tempfile.TemporaryDirectory() as scratch:  # loader workers record skipped images in a file
        skip_log = Path(scratch) / "skipped_images.txt"
        estimate = estimate_k(clip, task, args, device, info, skip_log)
        skipped = skipped_images(skip_log)
    for path in skipped:
        get_logger().warning("replaced by the next image (--skip_bad_images): %s", path)
    return estimate


def prepare_out(out: str | None, is_main: bool) -> Path | None:
    """--out as a path whose folder exists (made here) and can be written; refused if a folder."""
    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise InputError(f"--out {out} is a folder; give the path of a JSON file, e.g. {path / 'k.json'}")
    if is_main:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"--out {out}: cannot make its folder {path.parent} ({err.strerror})") from err
        if not os.access(path.parent, os.W_OK):
            raise InputError(f"--out {out}: its folder {path.parent} cannot be written")
    return path


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
