"""Transforms, MergedDataset batching, the weighted sampler and image loading."""
from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data_fixtures as F
from data.augmentations import TwoViews, get_transforms
from data.data_utils import MergedDataset, load_image, train_sample_weights
from data.get_datasets import get_datasets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def resized_normalised(image: Image.Image, short_side: int, mean, std) -> np.ndarray:
    """Bicubic resize of the short side, then (x/255 - mean) / std: float64 [3, H, W]."""
    width, height = image.size
    if width <= height:
        size = (short_side, int(short_side * height / width))
    else:
        size = (int(short_side * width / height), short_side)
    pixels = np.asarray(image.resize(size, Image.BICUBIC), dtype=np.float64) / 255.0
    return ((pixels - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


@pytest.mark.parametrize("normalization, mean, std", [("imagenet", IMAGENET_MEAN, IMAGENET_STD),
                                                      ("clip", CLIP_MEAN, CLIP_STD)])
def test_test_transform_is_resize_center_crop_normalise(normalization, mean, std):
    image = random_image(20, 30)
    _, test_transform = get_transforms(16, 0.875, normalization)
    out = test_transform(image)
    full = resized_normalised(image, int(16 / 0.875), mean, std)  # 18 x 27
    top = int(round((full.shape[1] - 16) / 2.0))
    left = int(round((full.shape[2] - 16) / 2.0))
    assert out.dtype == torch.float32 and out.shape == (3, 16, 16)
    np.testing.assert_allclose(out.numpy(), full[:, top:top + 16, left:left + 16], atol=1e-5)


def test_train_transform_is_a_random_window_maybe_flipped():
    image = random_image(30, 20, seed=1)
    train_transform, _ = get_transforms(16, 0.875)
    full = resized_normalised(image, 18, IMAGENET_MEAN, IMAGENET_STD)
    windows = []
    for top in range(full.shape[1] - 15):
        for left in range(full.shape[2] - 15):
            crop = full[:, top:top + 16, left:left + 16]
            windows += [crop, crop[:, :, ::-1]]
    torch.manual_seed(0)
    outputs = [train_transform(image).numpy() for _ in range(8)]
    for out in outputs:
        assert min(np.abs(out - w).max() for w in windows) < 1e-5
    assert any(np.abs(outputs[0] - o).max() > 1e-3 for o in outputs[1:])


def test_two_views_applies_the_transform_twice():
    calls = []

    def base(image):
        calls.append(image)
        return torch.full((1,), float(len(calls)))

    views = TwoViews(base)("img")
    assert calls == ["img", "img"]
    assert isinstance(views, list) and [v.item() for v in views] == [1.0, 2.0]


def test_batches_of_two_views_and_bool_labelled_mask(tmp_path):
    F.make_fixture("cifar10", tmp_path)
    train_transform, _ = get_transforms(16)
    args = Namespace(dataset_name="cifar10", data_root=str(tmp_path), prop_train_labels=0.5)
    train, *_ = get_datasets("cifar10", TwoViews(train_transform), None, args)
    loader = DataLoader(train, batch_size=len(train), shuffle=False)
    views, targets, uq_idxs, is_labelled = next(iter(loader))
    assert len(views) == 2 and views[0].shape == (len(train), 3, 16, 16)
    assert is_labelled.dtype == torch.bool
    assert is_labelled.tolist() == [i < train.n_labelled for i in range(len(train))]
    assert targets.dtype == torch.int64 and uq_idxs.dtype == torch.int64


def test_sample_weights():
    merged = MergedDataset(list(range(3)), list(range(9)))
    weights = train_sample_weights(merged)
    expected = [1.0 if i < 3 else 3 / 9 for i in range(12)]
    assert weights.dtype == torch.float64
    assert weights.tolist() == pytest.approx(expected, abs=0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_load_image_converts_to_rgb(mode, tmp_path):
    path = tmp_path / "image.png"
    random_image(5, 4).convert(mode).save(path)
    image = load_image(path, "cub")
    assert image.mode == "RGB" and image.size == (5, 4)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))
