"""The community data API of GCD codebases (GCD, SimGCD, GET).

Typical use (data/loaders.py; the task of a run: data/task.py)::

    task = build_task("cub")          # the class split, K and the class names
    train_t, test_t = get_transforms()
    train_set, test_set, unlabelled_eval_set, parts = get_datasets(
        task.dataset_name, TwoViews(train_t), test_t, task)

Protocol (docs/method.md, "Data"): targets are remapped to old classes
0..K_old-1 in split-list order, then the new classes in theirs. The labelled
set is drawn with the legacy NumPy RNG seeded with 0 over the old-class
training images in dataset order (``np.random.choice(range(n), int(prop*n),
replace=False)``); every other training image is unlabelled.

A dataset root with images of only some classes (e.g. a test fixture) works:
the class splits and K always describe the full dataset, classes without
images are simply absent from every split, and the draw runs over the
old-class images present, so on the full data it is exactly the reference
draw. (ImageNet and Herbarium19 still need every class folder, which tells a
complete copy from one whose extraction stopped half-way.)
uq_idx = position of a sample in the training set (samples of the K classes
in dataset order); test samples are numbered within the test split.

The folder dataset (data/folder.py: your own images) reads its classes from its root. In
its labelled/unlabelled layout the classes of the unlabelled images are unknown: their
target is NO_LABEL (-1), every image with a class is labelled (no draw), the new classes
are an empty list and K comes from ``--num_classes`` or its estimate.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import numpy as np
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

import config
from data.data_utils import NO_LABEL, DatasetSource, GCDDataset, MergedDataset, RawSplit, dataset_not_found
from errors import InputError


def get_source(dataset_name: str, data_root: str | None = None, old_classes: str | None = None) -> DatasetSource:
    """The reader of ``dataset_name``, from its entry in ``config.DATASETS``; ValueError listing
    the valid names otherwise.

    The folder dataset has no fixed classes: its entry names a function that makes its reader
    from the folders under its root and ``old_classes`` (the --old_classes flag; data/folder.py).
    """
    module, name = config.check_dataset_name(dataset_name).reader.split(":")
    reader = getattr(importlib.import_module(module), name)
    if isinstance(reader, DatasetSource):
        return reader
    return reader(dataset_folder(dataset_name, data_root), old_classes)


def class_split(dataset_name: str, data_root: str | None = None,
                old_classes: str | None = None) -> tuple[list[int], list[int] | None]:
    """(old, new): the ORIGINAL class ids of the old and of the new classes, in split order;
    new is None where the classes of the unlabelled images are unknown (the folder dataset's
    labelled/unlabelled layout)."""
    return get_source(dataset_name, data_root, old_classes).class_splits()


def dataset_folder(dataset_name: str, data_root: str | None) -> Path | None:
    """Root folder (--data_root, else GET_*_ROOT, else default); None for built-in datasets."""
    if config.is_builtin(dataset_name):
        return None
    return config.dataset_root(dataset_name, data_root)


def download(dataset_name: str, data_root: str | None) -> None:
    """Download ``dataset_name`` into its root (--download: CIFAR only)."""
    source, root = get_source(dataset_name, data_root), dataset_folder(dataset_name, data_root)
    if source.download is None:
        raise InputError(
            f"--download is only available for cifar10 and cifar100, not {source.name!r}; "
            f"place the dataset under {root} yourself."
        )
    source.download(root)


def _split_lists(task) -> tuple[list[int], list[int]]:
    """(old, new) original class ids: the task's, or the dataset's split for a bare namespace."""
    if getattr(task, "train_classes", None) is not None:
        return [int(c) for c in task.train_classes], [int(c) for c in task.unlabeled_classes]
    old, new = class_split(task.dataset_name, getattr(task, "data_root", None), getattr(task, "old_classes", None))
    return old, new or []


def draw_labelled_positions(num_old_images: int, prop_train_labels: float) -> np.ndarray:
    """Positions (sorted int64) among the old-class images that get a label.

    The same stream as the reference's ``np.random.seed(0)`` followed by
    ``np.random.choice``, from a private RandomState so the global RNG is untouched.
    """
    size = int(prop_train_labels * num_old_images)
    chosen = np.random.RandomState(0).choice(range(num_old_images), size=size, replace=False)
    return np.sort(chosen).astype(np.int64)


def _keep_split_classes(raw: RawSplit, classes: list[int]) -> RawSplit:
    """The samples of ``raw`` whose class is one of ``classes`` or unknown, in dataset order."""
    return raw.subset(np.flatnonzero(np.isin(raw.targets, classes) | (raw.targets == NO_LABEL)))


def _labelled_positions(train_raw: RawSplit, old: list[int], prop_train_labels: float) -> np.ndarray:
    """Positions of the labelled training images: the reference draw among the old-class
    images; where the dataset itself has images of unknown class (NO_LABEL: the folder
    dataset's labelled/unlabelled layout), every image whose class it gives."""
    if (train_raw.targets == NO_LABEL).any():
        return np.flatnonzero(train_raw.targets != NO_LABEL)
    old_positions = np.flatnonzero(np.isin(train_raw.targets, old))
    return old_positions[draw_labelled_positions(len(old_positions), prop_train_labels)]


def get_datasets(
    dataset_name: str,
    train_transform: Callable | None,
    test_transform: Callable | None,
    task,
) -> tuple[MergedDataset, GCDDataset, GCDDataset, dict[str, GCDDataset]]:
    """Build the GCD datasets of ``dataset_name``.

    Returns ``(train_dataset, test_dataset, unlabelled_train_examples_test,
    datasets)``: the MergedDataset (labelled ++ unlabelled, ``train_transform``,
    which the caller usually wraps in TwoViews), the test split and the
    unlabelled training images with ``test_transform``, and
    ``datasets = {'train_labelled', 'train_unlabelled', 'test'}``.
    Underlying items are ``(image, remapped target, uq_idx)``.
    ``task``: a ``data.task.Task``, or any namespace with ``data_root`` (None: config
    default), ``prop_train_labels`` and optionally the class lists (else the dataset's).
    """
    data_root, old_classes = getattr(task, "data_root", None), getattr(task, "old_classes", None)
    source = get_source(dataset_name, data_root, old_classes)
    old, new = _split_lists(task)
    root = dataset_folder(dataset_name, data_root)
    target_map = {c: i for i, c in enumerate(old + new)}

    train_raw = _keep_split_classes(source.load_split(root, True), old + new)
    test_raw = _keep_split_classes(source.load_split(root, False), old + new)
    if len(train_raw) == 0:
        raise dataset_not_found(
            dataset_name, root, "no training image of any class of the split was found.", source.layout
        )
    labelled = _labelled_positions(train_raw, old, getattr(task, "prop_train_labels", 0.5))
    unlabelled = np.setdiff1d(np.arange(len(train_raw)), labelled)

    datasets = {
        "train_labelled": GCDDataset(train_raw, labelled, target_map, train_transform),
        "train_unlabelled": GCDDataset(train_raw, unlabelled, target_map, train_transform),
        "test": GCDDataset(test_raw, np.arange(len(test_raw)), target_map, test_transform),
    }
    train_dataset = MergedDataset(datasets["train_labelled"], datasets["train_unlabelled"])
    unlabelled_train_examples_test = GCDDataset(train_raw, unlabelled, target_map, test_transform)
    return train_dataset, datasets["test"], unlabelled_train_examples_test, datasets


def get_class_names(dataset_name: str, data_root: str | None, old: list[int], new: list[int],
                    style: str = "reference", old_classes: str | None = None) -> list[str]:
    """Class names in remapped label order (old then new): names[t] is the name of target t.

    ``style`` (--class_names) picks the strings: "reference" gives the reference code's, byte
    for byte, since stage 1 distils towards their text; "tidy" passes them through
    ``tidy_class_names``.
    """
    names = get_source(dataset_name, data_root, old_classes).class_names(dataset_folder(dataset_name, data_root))
    if style == "tidy":
        names = tidy_class_names(dataset_name, names)
    return [names[c] for c in old + new]


def tidy_class_names(dataset_name: str, names: list[str]) -> list[str]:
    """Readable names, indexed by original class id like ``names``: underscores as spaces
    ("aquarium_fish" -> "aquarium fish"); ImageNet takes open_clip's curated names instead
    (e.g. class 7 "cock" -> "rooster"). Not the reference's strings: opt-in only.
    """
    if dataset_name in ("imagenet_100", "imagenet_1k"):
        return list(IMAGENET_CLASSNAMES)
    return [name.replace("_", " ") for name in names]
