"""CUB-200-2011 in its official release layout.

Root layout::

    <root>/CUB_200_2011/
        images.txt              "<image id> <class folder>/<file>.jpg"
        image_class_labels.txt  "<image id> <class id, 1-based>"
        train_test_split.txt    "<image id> <1 = train, 0 = test>"
        classes.txt             "<class id, 1-based> <NNN.Class_Name>"
        images/<class folder>/<file>.jpg

Class id = the 1-based label minus 1 (0..199), the ids of the SSB split list.
Dataset order = the order of images.txt. Names: the classes.txt name without
its "NNN." prefix, underscores kept as the reference does
("001.Black_footed_Albatross" -> "Black_footed_Albatross"). Split
(docs/method.md, "Data"): old = SSB ``known_classes``, new = SSB Hard + Medium
+ Easy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data.data_utils import DatasetSource, RawSplit, dataset_not_found, require_paths, ssb_class_splits

NAME = "cub"
NUM_CLASSES = 200
_BASE = "CUB_200_2011"
_LAYOUT = """  CUB_200_2011/
    images.txt
    image_class_labels.txt
    train_test_split.txt
    classes.txt
    images/<class folder>/*.jpg"""


def _read_table(root: Path, file_name: str) -> dict[int, str]:
    """Parse "<id> <value>" lines of an annotation file into {id: value}."""
    require_paths(NAME, root, [f"{_BASE}/{file_name}"], _LAYOUT)
    table = {}
    for line in (root / _BASE / file_name).read_text(encoding="utf-8").splitlines():
        if line.strip():
            key, value = line.strip().split(" ", 1)
            table[int(key)] = value
    return table


def _load_split(root: Path | None, train: bool) -> RawSplit:
    """List the train or test images in images.txt order (no image is opened)."""
    require_paths(NAME, root, [f"{_BASE}/images"], _LAYOUT)
    images = _read_table(root, "images.txt")
    labels = _read_table(root, "image_class_labels.txt")
    is_train = _read_table(root, "train_test_split.txt")
    missing = [i for i in images if i not in labels or i not in is_train]
    if missing:
        raise dataset_not_found(
            NAME, root, f"image ids {missing[:5]} of images.txt have no label or no train/test flag.", _LAYOUT
        )
    wanted = "1" if train else "0"
    ids = [i for i in images if is_train[i].strip() == wanted]
    paths = [str(root / _BASE / "images" / images[i]) for i in ids]
    return RawSplit(NAME, paths, np.array([int(labels[i]) - 1 for i in ids], dtype=np.int64))


def _class_names(root: Path | None) -> list[str]:
    """The 200 class names indexed by 0-based class id."""
    classes = _read_table(root, "classes.txt")
    if sorted(classes) != list(range(1, NUM_CLASSES + 1)):
        raise dataset_not_found(
            NAME, root, f"{root / _BASE / 'classes.txt'} should list class ids 1..{NUM_CLASSES}.", _LAYOUT
        )
    return [classes[i].split(".", 1)[-1] for i in range(1, NUM_CLASSES + 1)]


CUB = DatasetSource(
    name=NAME,
    layout=_LAYOUT,
    class_splits=lambda: ssb_class_splits("cub_splits.json"),
    load_split=_load_split,
    class_names=_class_names,
)
