"""Built-in demo dataset: scikit-learn's handwritten digits (no download, no root).

``sklearn.datasets.load_digits()`` holds 1,797 grey 8x8 images of the digits
0-9 with ink intensities 0..16. Each is served as a 32x32 RGB image (every
pixel repeated 4x4, dark ink on white, the grey value copied to the three
channels) so the normal transforms apply. Deterministic split: image i
(in load_digits order) is a test image when i % 5 == 0 (360 images), a
training image otherwise (1,437). Classes: 10, old = 0-4, new = 5-9; names
"zero" .. "nine".
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from data.data_utils import DatasetSource, RawSplit

NAME = "digits"
UPSCALE = 4
TEST_EVERY = 5
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def ink_to_rgb(counts: np.ndarray) -> np.ndarray:
    """Ink counts 0..16 [..., 8, 8] -> uint8 RGB images [..., 32, 32, 3]: dark ink on white,
    each pixel repeated 4x4 (also how scripts/pretrain_tiny_clip.py serves its rendered digits)."""
    grey = np.rint(255.0 - counts * (255.0 / 16.0)).astype(np.uint8)
    large = grey.repeat(UPSCALE, axis=-2).repeat(UPSCALE, axis=-1)
    return np.repeat(large[..., None], 3, axis=-1)


@lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    """All images as uint8 [1797, 32, 32, 3] and their labels int64 [1797]."""
    digits = load_digits()
    return ink_to_rgb(digits.images), digits.target.astype(np.int64)


def _load_split(root: Path | None, train: bool) -> RawSplit:
    """Train (i % 5 != 0) or test (i % 5 == 0) images; ``root`` is ignored."""
    images, targets = _all_digits()
    is_test = np.arange(len(targets)) % TEST_EVERY == 0
    keep = np.flatnonzero(~is_test if train else is_test)
    return RawSplit(NAME, images[keep], targets[keep])


DIGITS = DatasetSource(
    name=NAME,
    layout="(built in: generated from scikit-learn, nothing to place on disk)",
    class_splits=lambda: (list(range(5)), list(range(5, 10))),
    load_split=_load_split,
    class_names=lambda root: list(CLASS_NAMES),
)
