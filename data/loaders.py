"""The three loaders of a GET run: training (two views, weighted labelled/unlabelled draw) and
the evaluation loaders of the unlabelled training images and of the test split."""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from data.augmentations import TwoViews, get_transforms, resize_step
from data.data_utils import check_readable, skip_bad_images, train_sample_weights
from data.get_datasets import get_datasets
from data.image_cache import use_image_cache
from data.samplers import SeededSamples, ShardSampler, WeightedEpochSampler
from data.task import Task
from errors import InputError
from util.dist import DistInfo
from util.logging_utils import get_logger
from util.signals import LoaderWorkerSignals


@dataclass
class Loaders:
    train: DataLoader           # this process's part of each global batch: (views, label, uq_idx, is_labelled)
    unlabelled: DataLoader      # the unlabelled training images, test transform
    test: DataLoader            # the test split

    @property
    def eval_splits(self) -> dict[str, DataLoader]:
        return {"train_unlabelled": self.unlabelled, "test": self.test}


def build_loaders(task: Task, args: Namespace, image_size: int, info: DistInfo,
                  skip_log: Path | None = None) -> Loaders:
    """The loaders of ``task`` with the flags' batch size, workers, seed, normalisation and
    image cache; ``skip_log``: replace unreadable images (--skip_bad_images), listed there."""
    train_tf, test_tf = get_transforms(image_size=image_size, normalization=args.normalization)
    train_set, test_set, unlabelled_set, _ = get_datasets(task.dataset_name, TwoViews(train_tf), test_tf, task)
    # Images whose header failed (the folder dataset checks them all): stop now, not mid-training.
    check_readable([unlabelled_set.raw, test_set.raw], skipping=skip_log is not None)
    if args.image_cache is not None:  # images decoded and resized once (data/image_cache.py)
        splits = {"train": [train_set.labelled_dataset, train_set.unlabelled_dataset, unlabelled_set],
                  "test": [test_set]}
        use_image_cache(args.image_cache, splits, resize_step(image_size), info, args.num_workers, args.progress)
    if skip_log is not None:
        skip_bad_images([train_set, test_set, unlabelled_set], skip_log)
    sampler = WeightedEpochSampler(train_sample_weights(train_set), args.batch_size, args.seed,
                                   info.rank, info.world_size)
    if len(sampler) == 0:
        raise InputError(f"the training set of {task.dataset_name} has {len(train_set)} images, "
                         f"fewer than one batch ({args.batch_size}); lower --batch_size")
    cuda = args.device.startswith("cuda")
    # Persistent workers keep their RNG across epochs, which breaks bit-exact resume: only
    # where speed matters (CUDA).
    common = dict(batch_size=args.batch_size // info.world_size, num_workers=args.num_workers,
                  pin_memory=cuda, persistent_workers=cuda and args.num_workers > 0,
                  worker_init_fn=LoaderWorkerSignals())  # a cluster's SIGTERM to every process: util/signals.py
    # A loader-owned generator: starting an epoch's iterator leaves the global RNG untouched.
    # The worker seeds it gives are never what a sample draws from: SeededSamples reseeds.
    train = DataLoader(SeededSamples(train_set), sampler=sampler, generator=torch.Generator(), **common)

    def eval_loader(dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, sampler=ShardSampler(len(dataset), info.rank, info.world_size), **common)

    get_logger().info("dataset %s: %d labelled + %d unlabelled training images, %d old + %d new "
                      "classes", task.dataset_name, train_set.n_labelled, train_set.n_unlabelled,
                      task.num_labeled_classes, task.num_unlabeled_classes)
    return Loaders(train, eval_loader(unlabelled_set), eval_loader(test_set))
