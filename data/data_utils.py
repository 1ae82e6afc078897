"""Building blocks shared by every dataset module.

- ``load_image``: the single place where an image file is opened (16-bit greyscale scaled
  to 8 bits, every mode to RGB).
- ``DatasetNotFoundError``: the one error raised for a missing or incomplete
  dataset root; its message names the dataset, the path tried, the layout
  expected and the ``GET_*_ROOT`` variable / ``--data_root`` flag.
- ``RawSplit`` / ``GCDDataset``: a dataset split as read from disk (images and
  ORIGINAL class ids) and a view of some of its samples with REMAPPED targets.
- ``MergedDataset`` and the weighted sampler used for GCD training batches
  (docs/method.md, "Data").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import config
from errors import DatasetNotFoundError, ImageLoadError, InputError
from util.logging_utils import get_logger

SPLITS_DIR = Path(__file__).resolve().parent / "ssb_splits"


# The target of an image whose class nobody knows: the unlabelled images of the folder
# dataset's labelled/unlabelled layout (data/folder.py). Benchmarks never have it.
NO_LABEL = -1


# What PIL raises for a missing, corrupt or oversized (decompression bomb) image file.
IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def load_image(path: str | Path, dataset_name: str) -> Image.Image:
    """Open one image file as an RGB PIL image.

    Raises ImageLoadError naming the file and the dataset when the file is
    missing or corrupt, so a bad file deep inside a long run is easy to find.
    """
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except IMAGE_ERRORS as error:
        raise ImageLoadError(
            f"Cannot read image {path} of dataset {dataset_name!r} ({error}). "
            "Replace the file or re-extract the dataset."
        ) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB. Integer greyscale deeper than 8 bits (PIL modes ``I;16*``, ``I``) is
    scaled to 8 bits first: PIL's own conversion clips it at 255, which turns a 16-bit image
    almost entirely white. 16-bit data maps 0..65535 to 0..255 (divided by 257, rounded); an
    ``I`` image with larger values is scaled by its maximum, negative values become 0."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.clip(np.asarray(image).astype(np.int64), 0, None)
        top = max(65535, int(pixels.max(initial=0)))
        image = Image.fromarray(((pixels * 255 + top // 2) // top).astype(np.uint8))  # mode L
    return image.convert("RGB")


def image_header_size(path: str) -> tuple[int, int] | None:
    """(width, height) of an image file from its header (the pixels are not read); None when
    PIL cannot open it."""
    try:
        with Image.open(path) as image:
            return image.size
    except IMAGE_ERRORS:
        return None


def read_utf8_lines(path: Path, error: Callable[[str], Exception] = InputError) -> list[str]:
    """The lines of the UTF-8 text file ``path``, without the byte-order mark that Windows
    Notepad writes. Another encoding raises ``error(problem)``, the problem naming the file and
    the line (UnicodeDecodeError would say neither)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as decode_error:
        line = data[:decode_error.start].count(b"\n") + 1
        raise error(f"{path} is not UTF-8 text (line {line} holds the byte {data[decode_error.start]:#04x}, "
                    "as another encoding such as Latin-1 writes it). Save the file as UTF-8.") from None


def dataset_not_found(dataset_name: str, root: Path, problem: str, layout: str) -> DatasetNotFoundError:
    """Build the error for a bad root of ``dataset_name``.

    ``problem`` says what is wrong (e.g. which file is missing), ``layout`` is
    a short tree of what is expected under the root.
    """
    return DatasetNotFoundError(
        f"Dataset {dataset_name!r}: {problem}\n"
        f"Dataset root tried: {root}\n"
        f"Expected layout under the root:\n{layout.rstrip()}\n"
        f"Point to the folder with --data_root or the environment variable "
        f"{config.root_env_var(dataset_name)}."
    )


def require_paths(dataset_name: str, root: Path, relative_paths: Sequence[str], layout: str) -> None:
    """Raise DatasetNotFoundError unless ``root`` and every ``root/relative`` path exist."""
    if not root.is_dir():
        raise dataset_not_found(dataset_name, root, f"the folder {root} does not exist.", layout)
    for relative in relative_paths:
        if not (root / relative).exists():
            raise dataset_not_found(
                dataset_name, root, f"missing {root / relative} (the root is incomplete).", layout
            )


def read_json_split(file_name: str) -> dict[str, Any]:
    """Load one of the class-split lists shipped in data/ssb_splits/."""
    with open(SPLITS_DIR / file_name, encoding="utf-8") as handle:
        return json.load(handle)


def ssb_class_splits(file_name: str) -> tuple[list[int], list[int]]:
    """SSB split: old = ``known_classes``; new = Hard + Medium + Easy, in that order."""
    info = read_json_split(file_name)
    unknown = info["unknown_classes"]
    return list(info["known_classes"]), unknown["Hard"] + unknown["Medium"] + unknown["Easy"]


@dataclass
class RawSplit:
    """One split of a dataset as stored: images and their ORIGINAL class ids.

    images: a list of file paths (opened lazily through ``load_image``), or a
        uint8 array [N, H, W, 3] of images held in memory (CIFAR, digits).
    targets: int64 array [N] of original class ids, in dataset order (NO_LABEL for an
        image of unknown class).
    unreadable: the paths among ``images`` whose header PIL cannot open, where the dataset
        checked them when it was read (the folder dataset); ``check_readable`` stops the run
        on them before training.
    """

    dataset_name: str
    images: Sequence[str] | np.ndarray
    targets: np.ndarray
    unreadable: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> Image.Image:
        """Return image ``index`` as an RGB PIL image."""
        if isinstance(self.images, np.ndarray):
            return Image.fromarray(self.images[index])
        return load_image(self.images[index], self.dataset_name)

    def subset(self, keep: np.ndarray) -> "RawSplit":
        """The samples at positions ``keep`` (int array), in that order."""
        if isinstance(self.images, np.ndarray):
            images: Sequence[str] | np.ndarray = self.images[keep]
        else:
            images = [self.images[i] for i in keep]
        kept = set(images) if self.unreadable else set()
        return RawSplit(self.dataset_name, images, self.targets[keep],
                        tuple(path for path in self.unreadable if path in kept))


def check_readable(raws: Sequence[RawSplit], skipping: bool) -> None:
    """Stop before training when images of ``raws`` failed their header check (``unreadable``),
    listing them all at once: one bad file should not end a run half-way, nor take a run per
    file to find. With ``skipping`` (--skip_bad_images) they are only announced: training
    replaces each by another image and lists it in the run's skipped_images.txt."""
    bad = sorted({path for raw in raws for path in raw.unreadable})
    if not bad:
        return
    shown = "".join(f"\n  {path}" for path in bad[:5]) + (f"\n  ... and {len(bad) - 5} more" * (len(bad) > 5))
    what = (f"{len(bad)} image file{'s' if len(bad) > 1 else ''} of dataset {raws[0].dataset_name!r} cannot be "
            f"opened (empty, cut short, not an image, or too large to decode):{shown}")
    if not skipping:
        raise ImageLoadError(f"{what}\nReplace or delete them, or pass --skip_bad_images to train "
                             "without them (each is replaced by another image of its split and listed "
                             "in the run's skipped_images.txt).")
    get_logger().warning("%s\n--skip_bad_images: they are replaced by other images and listed in "
                         "skipped_images.txt", what)


@dataclass(frozen=True)
class DatasetSource:
    """How to read one dataset.

    layout: the expected tree under the root, shown in errors.
    class_splits(): (old class ids, new class ids), ORIGINAL ids in split order; new is None
        where the new classes are unknown (their images have target NO_LABEL).
    load_split(root, train): the train or test RawSplit; root is None for
        built-in datasets.
    class_names(root): names indexed by ORIGINAL class id, the reference's strings.
    download(root): optional opt-in download (CIFAR only).
    """

    name: str
    layout: str
    class_splits: Callable[[], tuple[list[int], list[int]]]
    load_split: Callable[[Path | None, bool], RawSplit]
    class_names: Callable[[Path | None], list[str]]
    download: Callable[[Path], None] | None = None


def remap_targets(targets: np.ndarray, target_map: dict[int, int]) -> np.ndarray:
    """Map original class ids (int array [N]) to remapped ids, int64 [N]; NO_LABEL stays.

    A lookup table keeps this vectorised (ImageNet-1k has 1.28M targets).
    """
    targets = np.asarray(targets, dtype=np.int64)
    size = max(max(target_map, default=0), int(targets.max(initial=0))) + 1
    table = np.full(size, -1, dtype=np.int64)
    table[list(target_map)] = list(target_map.values())
    known = targets != NO_LABEL  # an image without a label stays NO_LABEL
    remapped = np.full_like(targets, NO_LABEL)
    remapped[known] = table[targets[known]]
    if (remapped[known] < 0).any():
        missing = sorted(set(targets[known][remapped[known] < 0].tolist()))
        raise ValueError(f"Class ids {missing[:10]} are in neither the old nor the new class list.")
    return remapped


class GCDDataset(Dataset):
    """Some samples of a RawSplit with remapped targets.

    Item: ``(transform(image), target, uq_idx)`` with target the REMAPPED class
    (old classes 0..K_old-1, then new) and uq_idx the sample's position in the
    split it comes from (unique within the training set).

    Attributes: ``targets`` int64 [N] remapped, ``uq_idxs`` int64 [N],
    ``transform`` (may be replaced, e.g. by a TwoViews).
    """

    def __init__(
        self,
        raw: RawSplit,
        indices: np.ndarray,
        target_map: dict[int, int],
        transform: Callable | None,
    ) -> None:
        self.raw = raw
        self.uq_idxs = np.asarray(indices, dtype=np.int64)
        self.targets = remap_targets(raw.targets[self.uq_idxs], target_map)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.uq_idxs)

    # Where unreadable images are recorded when they are skipped; None: they stop the run.
    skip_log: Path | None = None

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            try:
                image = self.raw.image(int(self.uq_idxs[position]))
                break
            except ImageLoadError as error:
                if self.skip_log is None:  # say how to go on without it
                    raise ImageLoadError(f"{error} Or pass --skip_bad_images to replace such images by "
                                         "others (listed in the run's skipped_images.txt).") from error
                record_skipped_image(self.skip_log, error)
        else:
            raise ImageLoadError(f"no readable image at all in this split of {self.raw.dataset_name!r}")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[position]), int(self.uq_idxs[position])


def record_skipped_image(log_path: Path, error: ImageLoadError) -> None:
    """Append one line per skipped image. A file (not a counter) so that DataLoader worker
    processes can all report; lines are short and written in one call, so they don't interleave.
    A file name that is not valid UTF-8 is written as its bytes (surrogateescape)."""
    with open(log_path, "a", encoding="utf-8", errors="surrogateescape") as f:
        f.write(str(error).replace("\n", " ") + "\n")


def skip_bad_images(datasets: Sequence[Dataset], log_path: Path) -> None:
    """Let these datasets (GCDDataset, or MergedDataset of them) replace an unreadable image by
    the next readable sample of the same split, recording it in ``log_path``."""
    for dataset in datasets:
        if isinstance(dataset, MergedDataset):
            skip_bad_images([dataset.labelled_dataset, dataset.unlabelled_dataset], log_path)
        else:
            dataset.skip_log = log_path


def skipped_images(log_path: Path) -> list[str]:
    """The distinct lines ``record_skipped_image`` wrote so far, sorted (one per skipped file)."""
    if not log_path.is_file():
        return []
    return sorted(set(log_path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()))


def count_skipped_images(log_path: Path) -> int:
    """Distinct files recorded by ``record_skipped_image`` so far."""
    return len(skipped_images(log_path))


class MergedDataset(Dataset):
    """Labelled samples followed by unlabelled ones.

    Item: ``(views, target, uq_idx, is_labelled)``; ``is_labelled`` is a Python
    bool, which the default collate turns into a torch.bool tensor [B].
    """

    def __init__(self, labelled_dataset: Dataset, unlabelled_dataset: Dataset) -> None:
        self.labelled_dataset = labelled_dataset
        self.unlabelled_dataset = unlabelled_dataset

    @property
    def n_labelled(self) -> int:
        """Number of labelled samples (they come first)."""
        return len(self.labelled_dataset)

    @property
    def n_unlabelled(self) -> int:
        """Number of unlabelled samples (they come after the labelled ones)."""
        return len(self.unlabelled_dataset)

    def __len__(self) -> int:
        return self.n_labelled + self.n_unlabelled

    def __getitem__(self, index: int) -> tuple[Any, int, int, bool]:
        if index < self.n_labelled:
            views, target, uq_idx = self.labelled_dataset[index]
            return views, target, uq_idx, True
        views, target, uq_idx = self.unlabelled_dataset[index - self.n_labelled]
        return views, target, uq_idx, False


def train_sample_weights(merged: MergedDataset) -> torch.Tensor:
    """Sampling weights, float64 [len(merged)]: 1 per labelled sample, n_l/n_u per unlabelled one.

    This balances labelled and unlabelled samples in expectation (spec section 1).
    """
    n_labelled, n_unlabelled = merged.n_labelled, merged.n_unlabelled
    if n_labelled == 0 or n_unlabelled == 0:
        raise ValueError(
            f"GCD training needs labelled and unlabelled samples, got {n_labelled} labelled and "
            f"{n_unlabelled} unlabelled; check --prop_train_labels and that the dataset root "
            "holds images of both old and new classes."
        )
    weights = torch.full((n_labelled + n_unlabelled,), n_labelled / n_unlabelled, dtype=torch.float64)
    weights[:n_labelled] = 1.0
    return weights
