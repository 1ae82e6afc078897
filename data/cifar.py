"""CIFAR-10 and CIFAR-100 in torchvision's "python version" batch layout.

Root layout (what ``torchvision.datasets.CIFAR10/100(root, download=True)``
leaves behind)::

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <root>/cifar-100-python/{train, test, meta}

Each batch is a pickle with ``data`` (uint8 [N, 3072], channel-major 32x32)
and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100); the names come from
``label_names`` / ``fine_label_names`` of the meta file as they are
(torchvision's ``classes``, e.g. ``aquarium_fish``).
Splits (docs/method.md, "Data"): CIFAR-10 old = 0-4, CIFAR-100 old = 0-79.

The pickles are read by an unpickler that admits only what CIFAR files hold (dicts, lists,
strings, numbers, NumPy arrays): a tampered file is refused, naming it, instead of running
the code it carries.
"""
from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torchvision

from data.data_utils import DatasetSource, RawSplit, dataset_not_found, require_paths


@dataclass(frozen=True)
class _Format:
    """Files and keys of one CIFAR variant."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    name_key: str
    num_classes: int
    num_old: int


_FORMATS = {
    "cifar10": _Format(
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        "batches.meta", "labels", "label_names", 10, 5,
    ),
    "cifar100": _Format("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names", 100, 80),
}


def _layout(name: str) -> str:
    """Expected tree under the root, for error messages."""
    fmt = _FORMATS[name]
    files = ", ".join(fmt.train_files + fmt.test_files + (fmt.meta_file,))
    return f"  {fmt.folder}/\n    {files}\n(or pass --download to fetch it with torchvision)"


# Every global a CIFAR batch or meta pickle can name: NumPy's array reconstruction as NumPy 1
# (the official files), NumPy 2 (numpy._core) and pickle protocol 5 (_frombuffer) write it, and
# the bytes of a protocol-2 pickle written by Python 3. Anything else (a function, a class) is
# what a tampered file needs to run code while it is unpickled, so it is refused.
_CIFAR_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"{core}.{module}", name) for core in ("numpy.core", "numpy._core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays, nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which no CIFAR file holds")
        if module.startswith(("numpy.core.", "numpy._core.")):
            # numpy.core became numpy._core in NumPy 2: take whichever this NumPy has.
            part = module.split(".", 2)[2]
            for core in ("numpy._core", "numpy.core"):
                try:
                    return getattr(importlib.import_module(f"{core}.{part}"), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def _read_pickle(name: str, root: Path, path: Path) -> dict:
    """The dict pickled in the CIFAR file ``path``, read with ``_CifarUnpickler``; a
    DatasetNotFoundError naming the file when it is refused or cannot be read."""
    try:
        with open(path, "rb") as handle:
            # The batches were written by Python 2; latin1 keeps the uint8 buffers intact.
            entry = _CifarUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as error:
        raise dataset_not_found(name, root, f"{path} cannot be read as a CIFAR file ({error}): only "
                                "dicts, lists, strings, numbers and NumPy arrays are admitted, since a "
                                "tampered pickle can run code. Replace it with the file of the official "
                                "archive (or delete the folder and pass --download).",
                                _layout(name)) from None
    if not isinstance(entry, dict):
        raise dataset_not_found(name, root, f"{path} holds a {type(entry).__name__}, not the dict of a CIFAR "
                                "file. Replace it with the file of the official archive.", _layout(name))
    return entry


def _load_split(name: str, root: Path | None, train: bool) -> RawSplit:
    """Read the train (50k) or test (10k) images: uint8 [N, 32, 32, 3] and labels [N]."""
    fmt = _FORMATS[name]
    files = fmt.train_files if train else fmt.test_files
    require_paths(name, root, [f"{fmt.folder}/{f}" for f in files], _layout(name))
    images, targets = [], []
    for file_name in files:
        entry = _read_pickle(name, root, root / fmt.folder / file_name)
        if "data" not in entry or fmt.label_key not in entry:
            raise dataset_not_found(
                name, root, f"{root / fmt.folder / file_name} has no 'data' / '{fmt.label_key}' entry.",
                _layout(name),
            )
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        targets.extend(entry[fmt.label_key])
    pixels = np.concatenate(images).transpose(0, 2, 3, 1)
    return RawSplit(name, np.ascontiguousarray(pixels), np.asarray(targets, dtype=np.int64))


def _class_names(name: str, root: Path | None) -> list[str]:
    """Class names from the meta file, indexed by class id."""
    fmt = _FORMATS[name]
    meta_path = root / fmt.folder / fmt.meta_file
    require_paths(name, root, [f"{fmt.folder}/{fmt.meta_file}"], _layout(name))
    names = _read_pickle(name, root, meta_path).get(fmt.name_key, [])
    if len(names) != fmt.num_classes:
        raise dataset_not_found(
            name, root, f"{meta_path} should list {fmt.num_classes} '{fmt.name_key}', found {len(names)}.",
            _layout(name),
        )
    return list(names)


def _class_splits(name: str) -> tuple[list[int], list[int]]:
    """Old = the first K_old class ids, new = the rest."""
    fmt = _FORMATS[name]
    return list(range(fmt.num_old)), list(range(fmt.num_old, fmt.num_classes))


def _download(name: str, root: Path) -> None:
    """Fetch the dataset with torchvision (opt-in: needs internet)."""
    dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        for train in (True, False):
            dataset_class(root=str(root), train=train, download=True)
    except (OSError, URLError) as err:  # no network, a proxy, a full disk...
        raise dataset_not_found(name, root, f"--download could not fetch it ({err}). Download "
                                "the python version of the archive elsewhere and unpack it under "
                                "the root.", _layout(name)) from err


def _source(name: str) -> DatasetSource:
    """The DatasetSource of cifar10 or cifar100."""
    return DatasetSource(
        name=name,
        layout=_layout(name),
        class_splits=lambda: _class_splits(name),
        load_split=lambda root, train: _load_split(name, root, train),
        class_names=lambda root: _class_names(name, root),
        download=lambda root: _download(name, root),
    )


CIFAR10 = _source("cifar10")
CIFAR100 = _source("cifar100")
