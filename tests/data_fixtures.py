"""Tiny datasets written in each dataset's real on-disk format, for tests.

Every writer ``write_<dataset>(root, classes, n_train, n_test)`` creates the
full metadata of the dataset (all class names, as the real release has them)
but images only for ``classes`` (ORIGINAL class ids of the protocol; for
Herbarium, category ids = folder names). ``make_fixture(name, root)`` writes a
small valid dataset (a few old and a few new classes) for any dataset name
and returns the folder to pass as ``--data_root``.

Every image is 16x16 (CIFAR: 32x32) and encodes two numbers that tests read
back with ``decode_image``: its class (left half) and a serial number (right
half). Serial = position of the image in the dataset's training order (the
order the format defines: file order, annotation order or ImageFolder's
sorted folders/files); test images continue after the last training serial.
So for a fixture whose classes all belong to the split, ``uq_idx == serial``.
Colours are coarse (16 levels per channel) and JPEGs are written without
chroma subsampling, so the numbers survive compression.
"""
from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy.io import savemat

REPO_ROOT = Path(__file__).resolve().parent.parent
SPLITS_DIR = REPO_ROOT / "data" / "ssb_splits"
JPEG_SIZE = 16
CIFAR_SIZE = 32


# ---------------------------------------------------------------- pixel codes
def _colour(value: int) -> tuple[int, int, int]:
    """Three base-16 digits of ``value`` (< 4096) as mid-bin channel levels."""
    return tuple(8 + 16 * ((value >> shift) & 15) for shift in (0, 4, 8))


def encode_image(class_code: int, serial: int, size: int = JPEG_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: left half coloured by ``class_code``, right half by ``serial``."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:, : size // 2] = _colour(class_code)
    image[:, size // 2 :] = _colour(serial)
    return image


def decode_image(image: Image.Image) -> tuple[int, int]:
    """(class_code, serial) read back from an image made by ``encode_image``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    half = pixels.shape[1] // 2

    def number(region: np.ndarray) -> int:
        """Base-16 digits from the mean colour of a uniform region."""
        digits = np.clip(np.rint((region.mean(axis=(0, 1)) - 8) / 16), 0, 15).astype(int)
        return int(digits[0] + 16 * digits[1] + 256 * digits[2])

    return number(pixels[:, :half]), number(pixels[:, half:])


def _save_jpeg(path: Path, class_code: int, serial: int) -> None:
    """Write an encoded JPEG; 4:4:4 chroma keeps each 8x8 block a single colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(encode_image(class_code, serial)).save(path, format="JPEG", quality=95, subsampling=0)


def _samples(classes: Sequence[int], count: int) -> list[int]:
    """Class of each image when every class gets ``count`` images, class by class."""
    return [c for c in classes for _ in range(count)]


def _shuffled(items: list, seed: int) -> list:
    """A fixed permutation, so that dataset order is not simply class order."""
    order = np.random.RandomState(seed).permutation(len(items))
    return [items[i] for i in order]


# ------------------------------------------------------- names the loaders return
def _aircraft_variants() -> list[str]:
    """100 distinct variant names in the style of variants.txt (spaces, dashes, mixed case)."""
    stems = ["A3", "Boeing 7", "Cessna ", "DC-", "an-", "ATR-"]
    return [f"{stems[k % len(stems)]}{k}" for k in range(100)]


def _herbarium_names() -> dict[int, str]:
    """{category id: scientific name} of the shipped category list."""
    with open(REPO_ROOT / "data" / "herb_categories.txt", encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return {int(category): name for category, name in rows}


def imagenet_reference_names() -> list[str]:
    """The shipped copy of the reference's ImageNet class names (line i = class id i)."""
    return (REPO_ROOT / "data" / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()


def _imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 WordNet ids, sorted."""
    return (REPO_ROOT / "data" / "imagenet_wnids.txt").read_text(encoding="utf-8").split()


def class_name(dataset_name: str, class_id: int) -> str:
    """The name the loader must give class ``class_id`` of a fixture by default (Herbarium: a category id)."""
    if dataset_name in ("cifar10", "cifar100"):
        return f"thing_{class_id}"
    if dataset_name == "cub":
        return f"Fixture_bird_{class_id}"
    if dataset_name == "scars":
        return f"Fixture Car {class_id} 2012"
    if dataset_name == "aircraft":
        return sorted(_aircraft_variants())[class_id]
    if dataset_name in ("imagenet_100", "imagenet_1k"):
        return imagenet_reference_names()[class_id]
    if dataset_name == "herbarium_19":
        return _herbarium_names()[class_id]
    raise ValueError(f"No fixture names for dataset {dataset_name!r}.")


# -------------------------------------------------------------------- writers
def _cifar_batch(classes: list[int], first_serial: int, label_key: str) -> dict:
    """A CIFAR batch dict: ``data`` uint8 [N, 3072] channel-major, labels under ``label_key``."""
    data = np.stack([encode_image(c, first_serial + i, CIFAR_SIZE) for i, c in enumerate(classes)])
    return {
        "batch_label": "fixture batch",
        label_key: list(classes),
        "data": data.transpose(0, 3, 1, 2).reshape(len(classes), -1),
        "filenames": [f"img_{first_serial + i}.png" for i in range(len(classes))],
    }


def _dump(path: Path, obj: dict) -> None:
    """Pickle ``obj`` to ``path``, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def write_cifar10(root: Path, classes: Sequence[int], n_train: int = 4, n_test: int = 2) -> None:
    """cifar-10-batches-py/: train images dealt round-robin into data_batch_1..5."""
    folder = Path(root) / "cifar-10-batches-py"
    train = _samples(classes, n_train)
    batches = [train[k::5] for k in range(5)]
    serial = 0
    for k, batch in enumerate(batches, start=1):
        _dump(folder / f"data_batch_{k}", _cifar_batch(batch, serial, "labels"))
        serial += len(batch)
    _dump(folder / "test_batch", _cifar_batch(_shuffled(_samples(classes, n_test), 1), serial, "labels"))
    names = [f"thing_{c}" for c in range(10)]
    _dump(folder / "batches.meta", {"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072})


def write_cifar100(root: Path, classes: Sequence[int], n_train: int = 4, n_test: int = 2) -> None:
    """cifar-100-python/{train, test, meta} with fine and coarse labels."""
    folder = Path(root) / "cifar-100-python"
    train = _shuffled(_samples(classes, n_train), 0)
    test = _shuffled(_samples(classes, n_test), 1)
    for file_name, labels, first in (("train", train, 0), ("test", test, len(train))):
        batch = _cifar_batch(labels, first, "fine_labels")
        batch["coarse_labels"] = [c // 5 for c in labels]
        _dump(folder / file_name, batch)
    fine_names = [f"thing_{c}" for c in range(100)]
    _dump(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": [f"group_{g}" for g in range(20)]})


def write_cub(root: Path, classes: Sequence[int], n_train: int = 4, n_test: int = 2) -> None:
    """CUB_200_2011/ with the four annotation files (all 200 classes listed) and images/."""
    base = Path(root) / "CUB_200_2011"
    base.mkdir(parents=True, exist_ok=True)
    folders = {c: f"{c + 1:03d}.Fixture_bird_{c}" for c in range(200)}
    # Per class the real file interleaves train and test images; so do we.
    rows = [(c, is_train) for c in classes for is_train in _shuffled([True] * n_train + [False] * n_test, c)]
    train_serial, test_serial = 0, len(classes) * n_train
    images, labels, split = [], [], []
    for image_id, (c, is_train) in enumerate(rows, start=1):
        relative = f"{folders[c]}/Fixture_Bird_{image_id:04d}.jpg"
        if is_train:
            serial, train_serial = train_serial, train_serial + 1
        else:
            serial, test_serial = test_serial, test_serial + 1
        _save_jpeg(base / "images" / relative, c, serial)
        images.append(f"{image_id} {relative}")
        labels.append(f"{image_id} {c + 1}")
        split.append(f"{image_id} {int(is_train)}")
    for file_name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", [f"{c + 1} {folders[c]}" for c in range(200)]),
    ):
        (base / file_name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cars_annotations(classes: list[int], image_dir: Path, first_serial: int, first_file: int) -> np.ndarray:
    """Struct array [1, N] with the devkit fields; writes the images it names."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    annotations = np.zeros((1, len(classes)), dtype=[(f, "O") for f in fields])
    for i, c in enumerate(classes):
        fname = f"{first_file + i:05d}.jpg"
        _save_jpeg(image_dir / fname, c, first_serial + i)
        box = [np.array([[v]], dtype=np.uint8) for v in (1, 2, 14, 15)]
        # The devkit stores the 1-based class as uint8.
        annotations[0, i] = (*box, np.array([[c + 1]], dtype=np.uint8), np.array([fname]))
    return annotations


def write_scars(root: Path, classes: Sequence[int], n_train: int = 4, n_test: int = 2) -> None:
    """devkit/{cars_train_annos,cars_meta}.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/."""
    root = Path(root)
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    train = _shuffled(_samples(classes, n_train), 0)
    test = _shuffled(_samples(classes, n_test), 1)
    train_annotations = _cars_annotations(train, root / "cars_train", 0, 1)
    test_annotations = _cars_annotations(test, root / "cars_test", len(train), 1)
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": train_annotations})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": test_annotations})
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [f"Fixture Car {c} 2012" for c in range(196)]
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})


def write_aircraft(root: Path, classes: Sequence[int], n_train: int = 4, n_test: int = 2) -> None:
    """data/{variants.txt, images_variant_trainval.txt, images_variant_test.txt, images/}.

    variants.txt is written in a scrambled order: class ids are positions in
    the SORTED variant names, not in the file.
    """
    data = Path(root) / "data"
    data.mkdir(parents=True, exist_ok=True)
    names = sorted(_aircraft_variants())
    (data / "variants.txt").write_text("\n".join(_shuffled(names, 2)) + "\n", encoding="utf-8")
    train = _shuffled(_samples(classes, n_train), 0)
    test = _shuffled(_samples(classes, n_test), 1)
    for file_name, labels, first in (("trainval", train, 0), ("test", test, len(train))):
        lines = []
        for i, c in enumerate(labels):
            image_id = f"{1000000 + first + i:07d}"
            _save_jpeg(data / "images" / f"{image_id}.jpg", c, first + i)
            lines.append(f"{image_id} {names[c]}")
        (data / f"images_variant_{file_name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_image_folder(split_dir: Path, folders: Sequence[str], codes: Sequence[int], count: int,
                        first_serial: int, pattern: str) -> int:
    """One folder per class with ``count`` images; serials in ImageFolder order. Returns the next serial."""
    serial = first_serial
    for folder, code in sorted(zip(folders, codes)):
        for k in range(count):
            _save_jpeg(split_dir / folder / pattern.format(folder=folder, k=k), code, serial)
            serial += 1
    return serial


def _class_folders(split_dir: Path, folders: Sequence[str]) -> None:
    """Every class folder of a complete copy (the writers fill only some of them)."""
    for folder in folders:
        (split_dir / folder).mkdir(parents=True, exist_ok=True)


def write_imagenet(root: Path, classes: Sequence[int], n_train: int = 4, n_test: int = 2) -> None:
    """train/<wnid>/ and val/<wnid>/ of all 1000 classes; images for class ids ``classes``."""
    wnids = _imagenet_wnids()
    for split in ("train", "val"):
        _class_folders(Path(root) / split, wnids)
    folders = [wnids[c] for c in classes]
    after_train = _write_image_folder(Path(root) / "train", folders, classes, n_train, 0, "{folder}_{k:04d}.JPEG")
    val_pattern = "ILSVRC2012_val_{folder}{k:04d}.JPEG"
    _write_image_folder(Path(root) / "val", folders, classes, n_test, after_train, val_pattern)


def write_herbarium_19(root: Path, categories: Sequence[int], n_train: int = 4, n_test: int = 2) -> None:
    """small-train/<category id>/ of every category and small-validation/<category id>/;
    images (encoding the CATEGORY id) for ``categories``."""
    _class_folders(Path(root) / "small-train", [str(c) for c in _herbarium_names()])
    folders = [str(c) for c in categories]
    after_train = _write_image_folder(Path(root) / "small-train", folders, categories, n_train, 0, "{k:04d}.jpg")
    _write_image_folder(Path(root) / "small-validation", folders, categories, n_test, after_train, "{k:04d}.jpg")


# ----------------------------------------------------------------- make_fixture
def _ssb_lists(file_name: str) -> tuple[list[int], list[int]]:
    """(old, new) from a split JSON: Herbarium Old/New, or SSB known / Hard + Medium + Easy."""
    with open(SPLITS_DIR / file_name, encoding="utf-8") as handle:
        info = json.load(handle)
    if "Old" in info:
        return info["Old"], info["New"]
    unknown = info["unknown_classes"]
    return info["known_classes"], unknown["Hard"] + unknown["Medium"] + unknown["Easy"]


def imagenet_100_subset() -> list[int]:
    """ImageNet-100 classes, drawn exactly as the reference (global legacy RNG, seed 0)."""
    state = np.random.get_state()
    np.random.seed(0)
    subset = np.sort(np.random.choice(range(1000), size=(100,), replace=False)).tolist()
    np.random.set_state(state)
    return subset


def split_lists(dataset_name: str) -> tuple[list[int], list[int]]:
    """(old, new) ORIGINAL class ids of the protocol, in split order (docs/method.md, "Data")."""
    ranges = {"cifar10": (5, 10), "cifar100": (80, 100), "imagenet_1k": (500, 1000), "digits": (5, 10)}
    if dataset_name in ranges:
        num_old, num_classes = ranges[dataset_name]
        return list(range(num_old)), list(range(num_old, num_classes))
    if dataset_name == "imagenet_100":
        subset = imagenet_100_subset()
        return subset[:50], subset[50:]
    file_name = {"cub": "cub_splits.json", "scars": "scars_splits.json", "aircraft": "aircraft_splits.json",
                 "herbarium_19": "herbarium_19_splits.json"}[dataset_name]
    return _ssb_lists(file_name)


def herbarium_category(class_id: int) -> int:
    """Category id (folder name) of a Herbarium class id (ImageFolder index over all 683 folders)."""
    return int(sorted(str(c) for c in _herbarium_names())[class_id])


def default_classes(dataset_name: str, per_group: int = 3) -> list[int]:
    """The first ``per_group`` old and new classes of the split (Herbarium: as category ids)."""
    old, new = split_lists(dataset_name)
    classes = old[:per_group] + new[:per_group]
    if dataset_name == "herbarium_19":
        return [herbarium_category(c) for c in classes]
    return classes


WRITERS = {
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "imagenet_100": write_imagenet,
    "imagenet_1k": write_imagenet,
    "cub": write_cub,
    "scars": write_scars,
    "aircraft": write_aircraft,
    "herbarium_19": write_herbarium_19,
}


def make_fixture(dataset_name: str, root: Path, n_train: int = 4, n_test: int = 2) -> Path:
    """Write a small valid dataset (3 old + 3 new classes) under ``root``; return the --data_root.

    ``digits`` is built in: nothing is written and ``root`` is returned as is.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if dataset_name != "digits":
        WRITERS[dataset_name](root, default_classes(dataset_name), n_train, n_test)
    return root


# ------------------------------------------------------------ the folder dataset
FOLDER_CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")  # class code = position here


def _save_png(path: Path, class_code: int, serial: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(encode_image(class_code, serial)).save(path, format="PNG")


def write_folder(root: Path, layout: str = "train", n_old: int = 3, n_train: int = 4, n_test: int = 2,
                 classes: Sequence[str] = FOLDER_CLASSES) -> Path:
    """The folder dataset (data/folder.py) under ``root``; returns ``root``. Images encode
    (position of their class in ``classes``, serial); JPEGs and PNGs alternate.

    layout "train": train/<class>/ with ``n_train`` images of every class and test/<class>/
    with ``n_test``; the first ``n_old`` classes are meant as --old_classes.
    layout "labelled": labelled/<class>/ with ``n_train`` images of each of the first
    ``n_old`` classes, and unlabelled/ with ``n_train`` images of every class, spread over
    nested sub-folders under names that say nothing of their class.
    """
    root = Path(root)
    serial = 0

    def save(path: Path, code: int) -> None:
        nonlocal serial
        if serial % 2:
            _save_png(path.with_suffix(".png"), code, serial)
        else:
            _save_jpeg(path.with_suffix(".jpg"), code, serial)
        serial += 1

    if layout == "train":
        for split, count in (("train", n_train), ("test", n_test)):
            for code, name in sorted(enumerate(classes), key=lambda item: item[1]):
                for k in range(count):
                    save(root / split / name / f"{k:04d}", code)
    elif layout == "labelled":
        for code, name in sorted(enumerate(classes[:n_old]), key=lambda item: item[1]):
            for k in range(n_train):
                save(root / "labelled" / name / f"{k:04d}", code)
        pile = _shuffled([c for c in range(len(classes)) for _ in range(n_train)], seed=1)
        for k, code in enumerate(pile):
            save(root / "unlabelled" / ("day1", "day2/cam_a", "day2/cam_b")[k % 3] / f"img{k:04d}", code)
    else:
        raise ValueError(f"layout must be 'train' or 'labelled', not {layout!r}")
    return root
