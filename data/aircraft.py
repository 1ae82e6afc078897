"""FGVC-Aircraft (2013b) at the variant level.

Root layout (inside the extracted ``fgvc-aircraft-2013b`` folder)::

    data/variants.txt                 one variant name per line (100)
    data/images_variant_trainval.txt  "<image id> <variant name>"
    data/images_variant_test.txt
    data/images/<image id>.jpg

Class id = index of the variant name among the 100 names sorted as strings,
which is the reference's ``np.unique`` over the trainval names on the full
dataset; taking the names from variants.txt keeps the ids fixed for a partial
copy. Train = 'trainval', test = 'test'; dataset order = file order.
Split (docs/method.md, "Data"): old = SSB ``known_classes``, new = SSB Hard +
Medium + Easy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data.data_utils import DatasetSource, RawSplit, dataset_not_found, require_paths, ssb_class_splits

NAME = "aircraft"
NUM_CLASSES = 100
_LAYOUT = """  data/
    variants.txt
    images_variant_trainval.txt
    images_variant_test.txt
    images/*.jpg"""


def _lines(root: Path, file_name: str) -> list[str]:
    """Non-empty, stripped lines of data/<file_name>."""
    require_paths(NAME, root, [f"data/{file_name}"], _LAYOUT)
    text = (root / "data" / file_name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _class_names(root: Path | None) -> list[str]:
    """The 100 variant names sorted as strings (index = class id)."""
    names = sorted(set(_lines(root, "variants.txt")))
    if len(names) != NUM_CLASSES:
        raise dataset_not_found(
            NAME, root, f"{root / 'data' / 'variants.txt'} should list {NUM_CLASSES} variants, found {len(names)}.",
            _LAYOUT,
        )
    return names


def _load_split(root: Path | None, train: bool) -> RawSplit:
    """List the trainval or test images in file order (no image is opened)."""
    file_name = "images_variant_trainval.txt" if train else "images_variant_test.txt"
    class_of = {name: i for i, name in enumerate(_class_names(root))}
    require_paths(NAME, root, ["data/images"], _LAYOUT)
    paths, targets = [], []
    for line in _lines(root, file_name):
        # Variant names contain spaces ("Boeing 717"): only the first space separates.
        image_id, variant = line.split(" ", 1)
        if variant not in class_of:
            raise dataset_not_found(
                NAME, root, f"{root / 'data' / file_name} names variant {variant!r}, absent from variants.txt.",
                _LAYOUT,
            )
        paths.append(str(root / "data" / "images" / f"{image_id}.jpg"))
        targets.append(class_of[variant])
    return RawSplit(NAME, paths, np.array(targets, dtype=np.int64))


AIRCRAFT = DatasetSource(
    name=NAME,
    layout=_LAYOUT,
    class_splits=lambda: ssb_class_splits("aircraft_splits.json"),
    load_split=_load_split,
    class_names=_class_names,
)
