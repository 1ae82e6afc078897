"""Herbarium 2019 (FGVC6) small images, as two ImageFolders.

Root layout::

    <root>/small-train/<category id>/*.jpg       e.g. small-train/0/, small-train/682/
    <root>/small-validation/<category id>/*.jpg

Folders are named by the plain decimal category id (0..682). ImageFolder
sorts them as strings ("0", "1", "10", "100", ...), and the reference's class
ids and Old/New split lists are those ImageFolder indices. So here:
class id = index of the folder name among the 683 category-id strings sorted
as strings (the full dataset's ImageFolder index, fixed for a partial copy),
and the name of a class comes from its FOLDER NAME, i.e. its category id, in
data/herb_categories.txt (the reference maps names by index, which misaligns
them). Dataset order is ImageFolder's. Split: old = ``Old``, new = ``New``.
"""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from data.data_utils import DatasetSource, RawSplit, dataset_not_found, read_json_split, require_paths

NAME = "herbarium_19"
CATEGORIES_FILE = Path(__file__).resolve().parent / "herb_categories.txt"
_LAYOUT = """  small-train/
    0/ 1/ ... 682/   *.jpg (one folder per category id)
  small-validation/
    0/ 1/ ... 682/   *.jpg"""


@lru_cache(maxsize=1)
def category_names() -> dict[int, str]:
    """{category id: scientific name} from data/herb_categories.txt."""
    with open(CATEGORIES_FILE, encoding="utf-8", newline="") as handle:
        return {int(row["Category"]): row["ScientificName"] for row in csv.DictReader(handle)}


@lru_cache(maxsize=1)
def class_folders() -> tuple[str, ...]:
    """Folder names of all categories in ImageFolder order (index = class id)."""
    return tuple(sorted(str(category) for category in category_names()))


def _load_split(root: Path | None, train: bool) -> RawSplit:
    """List small-train/ or small-validation/ images (no image is opened)."""
    split_dir = "small-train" if train else "small-validation"
    require_paths(NAME, root, [split_dir], _LAYOUT)
    class_of = {folder: i for i, folder in enumerate(class_folders())}
    folders = sorted(p.name for p in (root / split_dir).iterdir() if p.is_dir())
    unknown = [f for f in folders if f not in class_of]
    if unknown:
        raise dataset_not_found(
            NAME, root, f"{root / split_dir} has folders that are not category ids: {unknown[:5]}.", _LAYOUT
        )
    missing = sorted(set(class_of) - set(folders), key=int)
    if train and missing:  # every category has training images in the real release
        raise dataset_not_found(NAME, root, f"{root / split_dir} lacks {len(missing)} of the "
                                f"{len(class_of)} category folders, e.g. {missing[:5]}: the copy "
                                "is incomplete.", _LAYOUT)
    samples = make_dataset(
        root / split_dir, {f: class_of[f] for f in folders}, extensions=IMG_EXTENSIONS, allow_empty=True
    )
    return RawSplit(NAME, [path for path, _ in samples], np.array([t for _, t in samples], dtype=np.int64))


def _class_names(root: Path | None) -> list[str]:
    """Scientific names indexed by class id, looked up through each class's folder name."""
    names = category_names()
    return [names[int(folder)] for folder in class_folders()]


def _class_splits() -> tuple[list[int], list[int]]:
    """Old / New lists of the Herbarium split (class ids = ImageFolder indices)."""
    info = read_json_split("herbarium_19_splits.json")
    return list(info["Old"]), list(info["New"])


HERBARIUM_19 = DatasetSource(
    name=NAME,
    layout=_LAYOUT,
    class_splits=_class_splits,
    load_split=_load_split,
    class_names=_class_names,
)
