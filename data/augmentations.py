"""Image transforms of GET (docs/method.md, "Backbone and transforms").

train: Resize(int(size / crop_pct), bicubic) -> RandomCrop(size) ->
RandomHorizontalFlip -> ColorJitter() -> ToTensor -> Normalize
test:  Resize(int(size / crop_pct), bicubic) -> CenterCrop(size) -> ToTensor -> Normalize

The reference normalises with ImageNet statistics although the backbone is
CLIP; that stays the default and ``normalization='clip'`` selects CLIP's.
"""
from __future__ import annotations

from typing import Callable

import torch
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import transforms

NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
}


def resize_step(image_size: int = 224, crop_pct: float = 0.875) -> transforms.Resize:
    """The deterministic first step of both transforms: the shorter side to
    int(image_size / crop_pct) px, bicubic, aspect ratio kept (what data/image_cache.py stores)."""
    return transforms.Resize(int(image_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC)


def get_transforms(
    image_size: int = 224, crop_pct: float = 0.875, normalization: str = "imagenet"
) -> tuple[Callable, Callable]:
    """(train_transform, test_transform): PIL image -> float32 tensor [3, image_size, image_size].

    Both start with ``resize_step``, which returns an image already at its size untouched (the
    image cache's), drawing no random number: cached or not, the random steps draw alike.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"Unknown normalization {normalization!r}; expected one of {sorted(NORMALIZATIONS)} "
            "(flag --normalization)."
        )
    mean, std = NORMALIZATIONS[normalization]
    normalize = transforms.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))
    train_transform = transforms.Compose([
        resize_step(image_size, crop_pct),
        transforms.RandomCrop(image_size),
        transforms.RandomHorizontalFlip(p=0.5),
        # Default arguments make this a no-op on the pixels; kept because the
        # reference has it and it draws from the torch RNG.
        transforms.ColorJitter(),
        transforms.ToTensor(),
        normalize,
    ])
    test_transform = transforms.Compose([
        resize_step(image_size, crop_pct),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize,
    ])
    return train_transform, test_transform


class TwoViews:
    """Apply ``base_transform`` twice, independently: image -> [view1, view2]."""

    def __init__(self, base_transform: Callable) -> None:
        self.base_transform = base_transform

    def __call__(self, image: object) -> list:
        """Two independently augmented views of ``image``."""
        return [self.base_transform(image), self.base_transform(image)]
