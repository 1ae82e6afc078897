"""Your own images as a GCD dataset: ``--dataset_name folder --data_root DIR``.

Two layouts, told apart by the folders under DIR.

Benchmark layout: every image sits in its class folder, ``--old_classes`` names the old
classes (a file with one folder name per line, or a comma list) and the other folders are
the new ones. The benchmarks' protocol applies unchanged: half of the old-class training
images labelled by the reference draw, the weighted sampler, All/Old/New accuracy::

    DIR/train/<class>/...          the training images of every class (sub-folders allowed)
    DIR/test/<class>/...           optional: held-out images of some of those classes
    DIR/class_names.txt            optional: "<folder><TAB><name>" lines (default: the folder name)

Class id = position of the folder among train/'s folders sorted as strings (ImageFolder's
order); remapped targets: the old classes in --old_classes order, then the new ones sorted.

Practitioner layout, the real use of GCD: labels for the classes you know, and a pile of
images of anything::

    DIR/labelled/<class>/...       the old classes: every image here is labelled (no draw)
    DIR/unlabelled/...             any images, any nesting, no labels (target NO_LABEL)
    DIR/class_names.txt            optional, as above

Nobody knows the new classes, so K comes from ``--num_classes N`` or is estimated
(evaluation/k_estimate.py), and the unlabelled images cannot be scored: the test split is the
labelled images (test transform), the only ones whose class is known, and the run describes
its clusters instead (evaluation/clusters.py).

An image is a file whose name ends in one of torchvision's image extensions (.jpg, .png, ...);
hidden files and folders are skipped. Each layout problem (a missing or empty folder, an
unknown old class or named folder) stops the run before any work, with a
``DatasetNotFoundError`` naming the path and the fix.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from data.data_utils import (NO_LABEL, DatasetNotFoundError, DatasetSource, RawSplit, dataset_not_found,
                             image_header_size, require_paths)

NAME = "folder"
NAMES_FILE = "class_names.txt"
LAYOUT = """  either (with --old_classes):
    train/<class>/*.jpg ...        one folder per class, old and new
    test/<class>/*.jpg ...         optional
  or:
    labelled/<class>/*.jpg ...     one folder per old class
    unlabelled/**/*.jpg ...        any images, any nesting, no labels
  and optionally class_names.txt   "<folder><TAB><name>" lines"""
_EXTENSIONS = ", ".join(IMG_EXTENSIONS)


def _error(root: Path, problem: str) -> DatasetNotFoundError:
    return dataset_not_found(NAME, root, problem, LAYOUT)


def folder_source(root: Path, old_classes: str | None) -> DatasetSource:
    """The folder dataset under ``root``; ``old_classes`` is the --old_classes flag.

    Reads the class folders (and the --old_classes file) now, the image files when a split
    is loaded. In the labelled/unlabelled layout ``class_splits`` gives ``new = None``.
    """
    if _is_practitioner(root):
        if old_classes:
            raise _error(root, f"--old_classes is for the train/ layout; in the labelled/ layout the "
                               f"old classes are the folders of {root / 'labelled'}: drop --old_classes.")
        folders = _class_folders(root, root / "labelled")
        return DatasetSource(NAME, LAYOUT, class_splits=lambda: (list(range(len(folders))), None),
                             load_split=lambda _, train: _load_practitioner(root, folders, train),
                             class_names=lambda _: _class_names(root, root / "labelled", folders))
    folders = _class_folders(root, root / "train")
    old = _old_class_ids(root, folders, old_classes)
    new = [i for i in range(len(folders)) if i not in old]
    return DatasetSource(NAME, LAYOUT, class_splits=lambda: (list(old), new),
                         load_split=lambda _, train: _load_benchmark(root, folders, train),
                         class_names=lambda _: _class_names(root, root / "train", folders))


def _is_practitioner(root: Path) -> bool:
    """True for the labelled/unlabelled layout, False for train/; an error for neither or both."""
    require_paths(NAME, root, [], LAYOUT)
    train, labelled = (root / "train").is_dir(), (root / "labelled").is_dir()
    if train and labelled:
        raise _error(root, f"{root} has both train/ and labelled/; keep the folders of one layout only.")
    if not (train or labelled):
        raise _error(root, f"{root} has neither train/ (every class in a folder, with --old_classes) "
                           "nor labelled/ and unlabelled/ (your classes, and images without labels).")
    if labelled and not (root / "unlabelled").is_dir():
        raise _error(root, f"missing {root / 'unlabelled'}: put the images without labels there "
                           "(any sub-folders).")
    return labelled


def _class_folders(root: Path, split_dir: Path) -> list[str]:
    """The class folders of ``split_dir``, sorted as strings; hidden ones skipped."""
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise _error(root, f"{split_dir} has no class folders: put the images of each class in a "
                           "folder named after it.")
    return folders


def parse_old_classes(value: str) -> list[str]:
    """--old_classes: the lines of the file ``value`` if there is one (blank lines skipped),
    else a comma-separated list of folder names."""
    if os.path.isfile(value):
        names = Path(value).read_text(encoding="utf-8").splitlines()
    else:
        names = value.split(",")
    return [name.strip() for name in names if name.strip()]


def _old_class_ids(root: Path, folders: list[str], old_classes: str | None) -> list[int]:
    """Class ids of the --old_classes folders, in the order given."""
    if not old_classes:
        raise _error(root, "the train/ layout needs --old_classes to say which classes are old "
                           "(labelled): a file with one folder name per line, or a comma list.")
    names = parse_old_classes(old_classes)
    source = f"the file {old_classes}" if os.path.isfile(old_classes) else "--old_classes"
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if not names or duplicates:
        raise _error(root, f"{source} names " + (f"{duplicates} twice" if duplicates else "no class")
                     + ": give each old class's folder name once.")
    missing = [name for name in names if name not in folders]
    if missing:
        not_a_file = f" (nor is there a file {old_classes})" if len(names) == 1 and source == "--old_classes" else ""
        raise _error(root, f"{source} names {missing[:5]}, but there is no folder "
                           f"{root / 'train' / missing[0]}{not_a_file}; the class folders are {folders[:8]}"
                           f"{' ...' if len(folders) > 8 else ''}. Correct the name or add the folder.")
    return [folders.index(name) for name in names]


def _class_names(root: Path, split_dir: Path, folders: list[str]) -> list[str]:
    """Name of each class (indexed like ``folders``): its line of class_names.txt, else its
    folder name."""
    path = root / NAMES_FILE
    if not path.is_file():
        return list(folders)
    names = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        folder, tab, name = line.partition("\t")
        if not tab or not folder.strip() or not name.strip():
            raise _error(root, f"{path} line {number} is not '<folder><TAB><name>': {line!r}. Separate "
                               "the folder name and the class name with one tab.")
        names[folder.strip()] = name.strip()
    unknown = sorted(set(names) - set(folders))
    if unknown:
        raise _error(root, f"{path} names folders that are not classes of {split_dir}: {unknown[:5]}. "
                           "Write each folder's exact name, or delete those lines.")
    return [names.get(folder, folder) for folder in folders]


def _load_benchmark(root: Path, folders: list[str], train: bool) -> RawSplit:
    """train/ (every class) or test/ (optional: empty without it), in ImageFolder order."""
    split_dir = root / ("train" if train else "test")
    if not train and not split_dir.is_dir():
        return RawSplit(NAME, [], np.zeros(0, dtype=np.int64))
    present = _class_folders(root, split_dir)
    unknown = [folder for folder in present if folder not in folders]
    if unknown:
        raise _error(root, f"{split_dir} has folders that are not classes of {root / 'train'}: "
                           f"{unknown[:5]}. A test class needs training images: rename or remove them.")
    return _read_classes(root, split_dir, [(folder, folders.index(folder)) for folder in present])


def _load_practitioner(root: Path, folders: list[str], train: bool) -> RawSplit:
    """Training split: the labelled images, then the unlabelled ones (target NO_LABEL); the
    test split: the labelled images alone."""
    labelled = _read_classes(root, root / "labelled", list(zip(folders, range(len(folders)))))
    if not train:
        return labelled
    pile = _readable_images(root, root / "unlabelled",
                            "put the images without labels there (any sub-folders)")
    targets = np.concatenate([labelled.targets, np.full(len(pile), NO_LABEL, dtype=np.int64)])
    return RawSplit(NAME, list(labelled.images) + pile, targets)


def _read_classes(root: Path, split_dir: Path, classes: list[tuple[str, int]]) -> RawSplit:
    """The images of each (folder, class id) of ``split_dir``, folder after folder."""
    images, targets = [], []
    for folder, class_id in classes:
        found = _readable_images(root, split_dir / folder, "put the class's images there or remove "
                                 "the folder")
        images += found
        targets += [class_id] * len(found)
    return RawSplit(NAME, images, np.array(targets, dtype=np.int64))


def _readable_images(root: Path, folder: Path, fix: str) -> list[str]:
    """The image files under ``folder`` (any depth, sorted by path); an error naming ``folder``
    and ``fix`` when there is none, or when none of them opens as an image."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, f) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)]
    found.sort()
    if not found:
        raise _error(root, f"{folder} holds no image (no file ending in {_EXTENSIONS}): {fix}.")
    if not any(image_header_size(path) is not None for path in found):  # stops at the first readable one
        raise _error(root, f"{folder} holds no readable image: none of its {len(found)} image files "
                           f"opens (corrupt, or not an image): {fix}.")
    return found
