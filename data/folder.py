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
hidden files and folders are skipped. Links are followed, to images and folders outside DIR
too, but every image is found once and under one class: a folder is walked once (a link loop
ends there), and a link to a folder that holds the one being walked, or into another class or
split folder, is not followed; what is skipped is logged. Every image's header is opened when
a split is read; the files that fail are the split's ``unreadable`` ones, which stop the run
before training unless --skip_bad_images (data_utils.check_readable). Folder and file names
are kept as the file system gives them (names that are not UTF-8 as surrogate escapes).

class_names.txt and the --old_classes file are UTF-8 text (a byte-order mark, as Windows
Notepad writes, is fine); a folder named on two lines is refused. Each layout problem (a
missing or empty folder, an unknown old class or named folder) stops the run before any work,
with a ``DatasetNotFoundError`` naming the path and the fix.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from data.data_utils import (NO_LABEL, DatasetNotFoundError, DatasetSource, RawSplit, dataset_not_found,
                             image_header_size, read_utf8_lines, require_paths)
from util.logging_utils import get_logger

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
SPLIT_DIRS = ("train", "test", "labelled", "unlabelled")


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


def _old_class_entries(value: str, root: Path | None) -> list[tuple[str, str]]:
    """(where, name) of each --old_classes name: "line N" of the file ``value``, or "item N"
    of the comma list."""
    if os.path.isfile(value):
        return [(f"line {number}", line.strip()) for number, line in enumerate(_text_lines(root, Path(value)), 1)
                if line.strip()]
    return [(f"item {number}", name.strip()) for number, name in enumerate(value.split(","), 1) if name.strip()]


def _text_lines(root: Path | None, path: Path) -> list[str]:
    """The lines of the UTF-8 text file ``path`` (``read_utf8_lines``); not UTF-8: a layout error."""
    return read_utf8_lines(path, lambda problem: _error(root, problem))


def _old_class_ids(root: Path, folders: list[str], old_classes: str | None) -> list[int]:
    """Class ids of the --old_classes folders, in the order given."""
    if not old_classes:
        raise _error(root, "the train/ layout needs --old_classes to say which classes are old "
                           "(labelled): a file with one folder name per line, or a comma list.")
    entries = _old_class_entries(old_classes, root)
    names = [name for _, name in entries]
    source = f"the file {old_classes}" if os.path.isfile(old_classes) else "--old_classes"
    if not names:
        raise _error(root, f"{source} names no class: give each old class's folder name once.")
    twice = _first_repeat(entries)
    if twice:
        raise _error(root, f"{source} names {twice[2]!r} twice ({twice[0]} and {twice[1]}): give each old "
                           "class's folder name once.")
    missing = [name for name in names if name not in folders]
    if missing:
        not_a_file = f" (nor is there a file {old_classes})" if len(names) == 1 and source == "--old_classes" else ""
        raise _error(root, f"{source} names {missing[:5]}, but there is no folder "
                           f"{root / 'train' / missing[0]}{not_a_file}; the class folders are {folders[:8]}"
                           f"{' ...' if len(folders) > 8 else ''}. Correct the name or add the folder.")
    return [folders.index(name) for name in names]


def _first_repeat(entries: list[tuple[str, str]]) -> tuple[str, str, str] | None:
    """(where first, where again, name) of the first name of (where, name) ``entries`` given twice."""
    first = {}
    for where, name in entries:
        if name in first:
            return first[name], where, name
        first[name] = where
    return None


def _class_names(root: Path, split_dir: Path, folders: list[str]) -> list[str]:
    """Name of each class (indexed like ``folders``): its line of class_names.txt, else its
    folder name."""
    path = root / NAMES_FILE
    if not path.is_file():
        return list(folders)
    names, lines = {}, []
    for number, line in enumerate(_text_lines(root, path), start=1):
        if not line.strip():
            continue
        folder, tab, name = line.partition("\t")
        if not tab or not folder.strip() or not name.strip():
            raise _error(root, f"{path} line {number} is not '<folder><TAB><name>': {line!r}. Separate "
                               "the folder name and the class name with one tab.")
        names[folder.strip()] = name.strip()
        lines.append((f"line {number}", folder.strip()))
    twice = _first_repeat(lines)
    if twice:
        raise _error(root, f"{path} names the folder {twice[2]!r} on {twice[0]} and on {twice[1]}: keep "
                           "one line per folder.")
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
    pile, unreadable = _readable_images(root, root / "unlabelled", _dataset_folders(root),
                                        "put the images without labels there (any sub-folders)")
    targets = np.concatenate([labelled.targets, np.full(len(pile), NO_LABEL, dtype=np.int64)])
    return RawSplit(NAME, list(labelled.images) + pile, targets, labelled.unreadable + tuple(unreadable))


def _read_classes(root: Path, split_dir: Path, classes: list[tuple[str, int]]) -> RawSplit:
    """The images of each (folder, class id) of ``split_dir``, folder after folder."""
    fenced = _dataset_folders(root)
    images, targets, unreadable = [], [], []
    for folder, class_id in classes:
        found, bad = _readable_images(root, split_dir / folder, fenced, "put the class's images there or "
                                      "remove the folder")
        images += found
        targets += [class_id] * len(found)
        unreadable += bad
    return RawSplit(NAME, images, np.array(targets, dtype=np.int64), tuple(unreadable))


def _readable_images(root: Path, folder: Path, fenced: list[str], fix: str) -> tuple[list[str], list[str]]:
    """The image files under ``folder`` (``_image_files``) and those of them whose header does
    not open; an error naming ``folder`` and ``fix`` when there is no image, or none opens."""
    found = _image_files(root, folder, fenced)
    if not found:
        raise _error(root, f"{folder} holds no image (no file ending in {_EXTENSIONS}): {fix}.")
    # The header alone, no pixels: about 35 us an image (70 ms for 2000 small ones, warm disk cache).
    unreadable = [path for path in found if image_header_size(path) is None]
    if len(unreadable) == len(found):
        raise _error(root, f"{folder} holds no readable image: none of its {len(found)} image files "
                           f"opens (corrupt, or not an image): {fix}.")
    return found, unreadable


def _dataset_folders(root: Path) -> list[str]:
    """Real paths of the split folders under ``root`` and of the class folders in them: a link
    into one of them from another class folder would give its images a second class."""
    folders = []
    for split in SPLIT_DIRS:
        if (root / split).is_dir():
            folders.append(os.path.realpath(root / split))
            if split != "unlabelled":  # its sub-folders are not classes
                folders += [os.path.realpath(p) for p in (root / split).iterdir() if p.is_dir()]
    return folders


def _image_files(root: Path, folder: Path, fenced: list[str]) -> list[str]:
    """The image files under ``folder`` (any depth, hidden names skipped), each once, sorted by
    path; links are followed except where that would find an image twice or under another class
    (``_link_problem``), and each folder is walked once, so that a link loop ends. A file
    reached twice (two links, or hard links, to one file) counts once, under its first path."""
    top = os.path.realpath(folder)
    if os.path.islink(folder) and any(_inside(other, top) and other != top for other in fenced):
        raise _error(root, f"{folder} is a link to {top}, which holds other class or split folders of "
                           "the dataset (a loop): point it at the class's own images.")
    walked, skipped, found = set(), [], []
    pending = [str(folder)]
    while pending:
        directory = pending.pop()
        try:
            info = os.stat(directory)
            if (info.st_dev, info.st_ino) in walked:
                skipped.append(f"{directory}: a folder already walked (a link loop, or a second link to it)")
                continue
            walked.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append(f"{directory}: cannot be listed ({error.strerror})")
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            problem = _link_problem(entry, top, fenced)
            if problem:
                skipped.append(f"{entry.path}: {problem}")
            elif entry.is_dir():
                subfolders.append(entry.path)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                found.append((entry.path, _file_id(entry, info.st_dev)))
        pending += reversed(subfolders)  # walked in name order: the same first path every time
    images = _once_each(sorted(found), skipped)
    _log_skipped(folder, skipped)
    return images


def _link_problem(entry: os.DirEntry, top: str, fenced: list[str]) -> str | None:
    """Why the link ``entry``, under the folder whose real path is ``top``, is not followed;
    None to follow it (not a link, or a link elsewhere: outside the dataset's root too)."""
    if not entry.is_symlink():
        return None
    target = os.path.realpath(entry.path)
    if _inside(top, target):
        return f"a link to {target}, which holds this folder (a loop); not followed"
    if not _inside(target, top) and any(_inside(target, other) for other in fenced):
        return (f"a link to {target}, inside another class or split folder of the dataset (an image "
                "belongs to one); not followed")
    return None


def _inside(path: str, folder: str) -> bool:
    """Whether the real path ``path`` is ``folder`` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _file_id(entry: os.DirEntry, device: int) -> tuple[int, int] | str:
    """(device, inode) of the file ``entry`` names (through a link: of its target; a broken
    link: its path, so that it is kept and reported as unreadable)."""
    if not entry.is_symlink():
        return device, entry.inode()
    try:
        info = os.stat(entry.path)
    except OSError:
        return entry.path
    return info.st_dev, info.st_ino


def _once_each(found: list[tuple[str, tuple[int, int] | str]], skipped: list[str]) -> list[str]:
    """The paths of sorted (path, file id) pairs, the first path of each file only."""
    seen, paths = set(), []
    for path, file_id in found:
        if file_id in seen:
            skipped.append(f"{path}: the same file as an image found before; counted once")
            continue
        seen.add(file_id)
        paths.append(path)
    return paths


def _log_skipped(folder: Path, skipped: list[str]) -> None:
    """One warning for what the walk of ``folder`` left out (the first five, and the count)."""
    if skipped:
        more = f"\n  ... and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        get_logger().warning("folder dataset: %d entries under %s left out:%s%s", len(skipped),
                             folder, "".join(f"\n  {s}" for s in skipped[:5]), more)
