"""Stanford Cars with the devkit .mat annotations.

Root layout (as torchvision's StanfordCars expects it)::

    <root>/devkit/cars_train_annos.mat   struct array `annotations`
    <root>/devkit/cars_meta.mat          cell array `class_names` (196)
    <root>/cars_test_annos_withlabels.mat  (devkit/ is accepted too)
    <root>/cars_train/*.jpg
    <root>/cars_test/*.jpg

Each annotation has fields ``bbox_x1, bbox_y1, bbox_x2, bbox_y2, class,
fname``; ``class`` is 1-based, class id = class - 1 (0..195), the ids of the
SSB split list. Dataset order = annotation order. Names: ``class_names`` of
cars_meta.mat. Split (docs/method.md, "Data"): old = SSB ``known_classes``,
new = SSB Hard + Medium + Easy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import loadmat

from data.data_utils import DatasetSource, RawSplit, dataset_not_found, require_paths, ssb_class_splits

NAME = "scars"
NUM_CLASSES = 196
_TEST_ANNOS = "cars_test_annos_withlabels.mat"
_LAYOUT = """  devkit/
    cars_train_annos.mat
    cars_meta.mat
  cars_test_annos_withlabels.mat   (or devkit/cars_test_annos_withlabels.mat)
  cars_train/*.jpg
  cars_test/*.jpg"""


def _annotation_file(root: Path, train: bool) -> Path:
    """Path of the annotation file of a split; the test labels may sit at the root or in devkit/."""
    if train:
        require_paths(NAME, root, ["devkit/cars_train_annos.mat"], _LAYOUT)
        return root / "devkit" / "cars_train_annos.mat"
    require_paths(NAME, root, [], _LAYOUT)
    for candidate in (root / _TEST_ANNOS, root / "devkit" / _TEST_ANNOS):
        if candidate.is_file():
            return candidate
    raise dataset_not_found(NAME, root, f"missing {root / _TEST_ANNOS} (the root is incomplete).", _LAYOUT)


def _scalar(value: np.ndarray) -> object:
    """Unwrap a MATLAB scalar or string stored as a nested array."""
    return np.asarray(value).reshape(-1)[0]


def _load_split(root: Path | None, train: bool) -> RawSplit:
    """List the train or test images in annotation order (no image is opened)."""
    image_dir = "cars_train" if train else "cars_test"
    annotation_file = _annotation_file(root, train)
    require_paths(NAME, root, [image_dir], _LAYOUT)
    annotations = loadmat(annotation_file).get("annotations")
    if annotations is None or not {"class", "fname"} <= set(annotations.dtype.names or ()):
        raise dataset_not_found(
            NAME, root, f"{annotation_file} has no `annotations` struct with `class` and `fname` fields.", _LAYOUT
        )
    annotations = annotations.reshape(-1)
    paths = [str(root / image_dir / str(_scalar(a["fname"]))) for a in annotations]
    # Cast before subtracting: the devkit stores classes as uint8.
    targets = np.array([int(_scalar(a["class"])) - 1 for a in annotations], dtype=np.int64)
    return RawSplit(NAME, paths, targets)


def _class_names(root: Path | None) -> list[str]:
    """The 196 class names indexed by 0-based class id."""
    require_paths(NAME, root, ["devkit/cars_meta.mat"], _LAYOUT)
    names = loadmat(root / "devkit" / "cars_meta.mat").get("class_names")
    if names is None or names.size != NUM_CLASSES:
        raise dataset_not_found(
            NAME, root, f"{root / 'devkit' / 'cars_meta.mat'} should hold {NUM_CLASSES} `class_names`.", _LAYOUT
        )
    return [str(_scalar(n)) for n in names.reshape(-1)]


SCARS = DatasetSource(
    name=NAME,
    layout=_LAYOUT,
    class_splits=lambda: ssb_class_splits("scars_splits.json"),
    load_split=_load_split,
    class_names=_class_names,
)
