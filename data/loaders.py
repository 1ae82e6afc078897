"""The three loaders of a GET run: training (two views, weighted labelled/unlabelled draw) and
the evaluation loaders of the unlabelled training images and of the test split."""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from data.augmentations import TwoViews, get_transforms, resize_step
from data.data_utils import skip_bad_images, train_sample_weights
from data.get_datasets import get_class_names, get_class_splits, get_datasets
from data.image_cache import use_image_cache
from util.dist import DistInfo, ShardSampler, WeightedEpochSampler
from util.logging_utils import get_logger
from util.rng import seed_sample

SKIPPED_IMAGES = "skipped_images.txt"


class SeededSamples(Dataset):
    """``dataset[index]`` for the sampler's ``(index, seed)`` items, with every global
    generator an augmentation can draw from (torch's CPU one, NumPy's, Python's) seeded from
    ``seed`` while the sample is loaded (``util.rng.seed_sample``): its augmentation depends on
    the sample's seed alone, not on the process or loader worker that loads it.

    torch's generator is given back to the caller as it was; NumPy's and Python's are left
    seeded (restoring them costs ten times the seeding, and nothing in a training step draws
    from them)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        state = torch.get_rng_state()
        seed_sample(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


@dataclass
class Loaders:
    train: DataLoader           # this process's part of each global batch: (views, label, uq_idx, is_labelled)
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
    if args.image_cache is not None:  # images decoded and resized once (data/image_cache.py)
        splits = {"train": [train_set.labelled_dataset, train_set.unlabelled_dataset, unlabelled_set],
                  "test": [test_set]}
        use_image_cache(args, splits, resize_step(image_size), info)
    if args.skip_bad_images:
        skip_bad_images([train_set, test_set, unlabelled_set], run_dir / SKIPPED_IMAGES)
    sampler = WeightedEpochSampler(train_sample_weights(train_set), args.batch_size, args.seed,
                                   info.rank, info.world_size)
    if len(sampler) == 0:
        raise ValueError(f"the training set of {args.dataset_name} has {len(train_set)} images, "
                         f"fewer than one batch ({args.batch_size}); lower --batch_size")
    cuda = args.device.startswith("cuda")
    # Persistent workers keep their RNG across epochs, which breaks bit-exact resume: only
    # where speed matters (CUDA).
    common = dict(batch_size=args.batch_size // info.world_size, num_workers=args.num_workers,
                  pin_memory=cuda, persistent_workers=cuda and args.num_workers > 0)
    # A loader-owned generator: starting an epoch's iterator leaves the global RNG untouched.
    # The worker seeds it gives are never what a sample draws from: SeededSamples reseeds.
    train = DataLoader(SeededSamples(train_set), sampler=sampler, generator=torch.Generator(), **common)

    def eval_loader(dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, sampler=ShardSampler(len(dataset), info.rank, info.world_size), **common)

    get_logger().info("dataset %s: %d labelled + %d unlabelled training images, %d old + %d new "
                      "classes", args.dataset_name, train_set.n_labelled, train_set.n_unlabelled,
                      args.num_labeled_classes, args.num_unlabeled_classes)
    return Loaders(train, eval_loader(unlabelled_set), eval_loader(test_set), get_class_names(args))
