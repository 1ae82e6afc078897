"""The three loaders of a GET run: training (two views, weighted labelled/unlabelled draw) and
the evaluation loaders of the unlabelled training images and of the test split."""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from data.augmentations import TwoViews, get_transforms
from data.data_utils import skip_bad_images, train_sample_weights
from data.get_datasets import get_class_names, get_class_splits, get_datasets
from util.dist import DistInfo, ShardSampler, WeightedEpochSampler
from util.logging_utils import get_logger

SKIPPED_IMAGES = "skipped_images.txt"


@dataclass
class Loaders:
    train: DataLoader           # batches of (views, label, uq_idx, is_labelled)
    unlabelled: DataLoader      # the unlabelled training images, test transform
    test: DataLoader            # the test split
    class_names: list[str]      # class_names[t]: name of remapped target t

    @property
    def eval_splits(self) -> dict[str, DataLoader]:
        return {"train_unlabelled": self.unlabelled, "test": self.test}


def build_loaders(args: Namespace, image_size: int, info: DistInfo, run_dir: Path) -> Loaders:
    """Loaders of ``args.dataset_name``; sets the class split on ``args`` (get_class_splits)."""
    get_class_splits(args)
    train_tf, test_tf = get_transforms(image_size=image_size, normalization=args.normalization)
    train_set, test_set, unlabelled_set, _ = get_datasets(args.dataset_name, TwoViews(train_tf), test_tf, args)
    if args.skip_bad_images:
        skip_bad_images([train_set, test_set, unlabelled_set], run_dir / SKIPPED_IMAGES)
    per_rank_batch = args.batch_size // info.world_size
    if per_rank_batch < 2:
        raise ValueError(f"--batch_size {args.batch_size} over {info.world_size} processes leaves "
                         "fewer than 2 samples per process; raise --batch_size")
    sampler = WeightedEpochSampler(train_sample_weights(train_set), len(train_set), args.seed,
                                   info.rank, info.world_size)
    if len(sampler) < per_rank_batch:
        raise ValueError(f"the training set of {args.dataset_name} has {len(train_set)} images, "
                         f"fewer than one batch ({args.batch_size}); lower --batch_size")
    cuda = args.device.startswith("cuda")
    # Persistent workers keep their RNG across epochs, which breaks bit-exact resume: only
    # where speed matters (CUDA).
    common = dict(batch_size=per_rank_batch, num_workers=args.num_workers, pin_memory=cuda,
                  persistent_workers=cuda and args.num_workers > 0)
    # A loader-owned generator, re-seeded every epoch by the engine, fixes the worker seeds
    # and leaves the global RNG untouched when an epoch starts (exact resume).
    train = DataLoader(train_set, sampler=sampler, drop_last=True, generator=torch.Generator(), **common)

    def eval_loader(dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, sampler=ShardSampler(len(dataset), info.rank, info.world_size), **common)

    get_logger().info("dataset %s: %d labelled + %d unlabelled training images, %d old + %d new "
                      "classes", args.dataset_name, train_set.n_labelled, train_set.n_unlabelled,
                      args.num_labeled_classes, args.num_unlabeled_classes)
    return Loaders(train, eval_loader(unlabelled_set), eval_loader(test_set), get_class_names(args))
