"""ImageNet-100 and ImageNet-1k from an ImageFolder copy of ILSVRC-2012.

Root layout (both variants read the same root)::

    <root>/train/n01440764/*.JPEG ... (one folder per WordNet id)
    <root>/val/n01440764/*.JPEG ...   (validation images sorted into the same folders)

Class id = index of the WordNet id among the 1000 ILSVRC-2012 ids sorted as
strings (data/imagenet_wnids.txt), which is torchvision ImageFolder's index on
the full dataset; fixed ids keep a partial copy (e.g. a test fixture with a
few folders) on the same ids. Class names: the reference's 1000-line list
(data/imagenet_classes.txt, line i = class id i; e.g. 7 = "cock"), not
open_clip's curated names (those are ``--class_names tidy``). Dataset order is
ImageFolder's: sorted folders, sorted files inside each.

Splits (docs/method.md, "Data"): ImageNet-1k old = 0-499, new = 500-999.
ImageNet-100 keeps the classes ``np.sort(np.random.choice(range(1000), 100,
replace=False))`` drawn after ``np.random.seed(0)``; the first 50 of them are
old. Its class ids stay ImageNet-1k ids, so the remapped targets 0..99 are the
positions in that sorted subset, as in the reference.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from data.data_utils import DatasetSource, RawSplit, dataset_not_found, require_paths

WNIDS_FILE = Path(__file__).resolve().parent / "imagenet_wnids.txt"
CLASSES_FILE = Path(__file__).resolve().parent / "imagenet_classes.txt"
_LAYOUT = """  train/
    n01440764/  *.JPEG   (one folder per WordNet id)
    ...
  val/
    n01440764/  *.JPEG   (validation images sorted into class folders)
    ..."""


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 WordNet ids, sorted (index = class id)."""
    return tuple(WNIDS_FILE.read_text(encoding="utf-8").split())


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The reference's 1000 class names, one a line (index = class id); names may hold spaces."""
    return tuple(CLASSES_FILE.read_text(encoding="utf-8").splitlines())


def imagenet_100_classes() -> list[int]:
    """The 100 ImageNet-1k class ids of ImageNet-100, sorted.

    Same stream as the reference's ``np.random.seed(0); np.random.choice``
    (the legacy global RNG is a RandomState), without touching global state.
    """
    chosen = np.random.RandomState(0).choice(range(1000), size=(100,), replace=False)
    return np.sort(chosen).tolist()


def _load_split(name: str, class_ids: list[int], root: Path | None, train: bool) -> RawSplit:
    """List the images of ``class_ids`` under train/ or val/ (no image is opened)."""
    split_dir = "train" if train else "val"
    require_paths(name, root, [split_dir], _LAYOUT)
    wnids = imagenet_wnids()
    wanted = {wnids[c]: c for c in class_ids}
    folders = sorted(p.name for p in (root / split_dir).iterdir() if p.is_dir())
    known = set(wnids)
    unknown = [f for f in folders if f not in known]
    if unknown or not folders:
        problem = (
            f"{root / split_dir} has folders that are not ImageNet WordNet ids: {unknown[:5]}."
            if unknown
            else f"{root / split_dir} has no class folders (validation images must be sorted into "
            "one folder per WordNet id)."
        )
        raise dataset_not_found(name, root, problem, _LAYOUT)
    missing = sorted(set(wanted) - set(folders))
    if missing:
        raise dataset_not_found(name, root, f"{root / split_dir} lacks {len(missing)} of the "
                                f"{len(wanted)} class folders of {name}, e.g. {missing[:5]}: the "
                                "copy is incomplete.", _LAYOUT)
    class_to_idx = {f: wanted[f] for f in folders if f in wanted}
    samples = make_dataset(root / split_dir, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    return RawSplit(name, [path for path, _ in samples], np.array([t for _, t in samples], dtype=np.int64))


def _source(name: str, old: list[int], new: list[int]) -> DatasetSource:
    """A DatasetSource reading only the folders of ``old + new``."""
    return DatasetSource(
        name=name,
        layout=_LAYOUT,
        class_splits=lambda: (list(old), list(new)),
        load_split=lambda root, train: _load_split(name, old + new, root, train),
        class_names=lambda root: list(imagenet_class_names()),
    )


IMAGENET_1K = _source("imagenet_1k", list(range(500)), list(range(500, 1000)))
IMAGENET_100 = _source("imagenet_100", imagenet_100_classes()[:50], imagenet_100_classes()[50:])
