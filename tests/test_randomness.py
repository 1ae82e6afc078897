"""Randomness that is random, not only reproducible: the augmentations of the training loader
(the real transforms, read off the views), the derived seeds, word dropout and the global
generators. Each test would fail if a stream repeated across epochs, stages, seeds,
processes or libraries; the statistical tests use a significance level of 0.001.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest, chi2_contingency
from torch.utils.data import DataLoader, Dataset

from data.augmentations import NORMALIZATIONS, TwoViews, get_transforms
from data.samplers import SeededSamples, WeightedEpochSampler
from methods.tes import word_drop_mask
from util.dist import DistInfo
from util.rng import derive_seed, seed_everything

ALPHA = 0.001
# The paper's transform: Resize(256) -> RandomCrop(224) -> flip -> ColorJitter(): a crop offset
# of 0..32 in each direction, mirrored with probability 1/2.
TRAIN_TRANSFORM = get_transforms(image_size=224)[0]
OFFSETS = 33


def coordinate_image() -> Image.Image:
    """256 x 256 RGB whose red value is the column and green value the row: a view's crop
    offset and flip can be read off its pixels."""
    ramp = np.arange(256, dtype=np.uint8)
    channels = [np.broadcast_to(ramp[None, :], (256, 256)), np.broadcast_to(ramp[:, None], (256, 256)),
                np.zeros((256, 256), np.uint8)]
    return Image.fromarray(np.ascontiguousarray(np.stack(channels, axis=-1)))


IMAGE = coordinate_image()


def view_parameters(view: torch.Tensor) -> tuple[int, int, bool]:
    """(row offset, column offset, mirrored) of a view of ``IMAGE``."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    pixels = ((view * std + mean) * 255).round().long()
    first, last = int(pixels[0, 0, 0]), int(pixels[0, 0, -1])
    return int(pixels[1, 0, 0]), min(first, last), first > last


class CoordinateViews(Dataset):
    """``n`` samples, each the two training views of ``IMAGE``, as the training sets give them."""

    def __init__(self, n: int):
        self.n, self.views = n, TwoViews(TRAIN_TRANSFORM)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.views(IMAGE), index


class EveryLibrary(Dataset):
    """A sample that draws from torch's, NumPy's and Python's global generators, as an
    augmentation library might."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int):
        return torch.rand(2), torch.from_numpy(np.random.rand(2)), torch.tensor([random.random()]), index


def epoch_views(n: int, seed: int, stage: str, epoch: int, positions: int | None = None) -> list:
    """[(view-1 parameters, view-2 parameters)] at the first ``positions`` positions of an
    epoch's draw, loaded as the training loader loads them."""
    sampler = WeightedEpochSampler(torch.ones(n), batch_size=n, seed=seed)
    sampler.set_epoch(epoch, stage=stage)
    samples = SeededSamples(CoordinateViews(n))
    return [tuple(view_parameters(v) for v in samples[item][0]) for item in list(sampler)[:positions]]


def test_the_same_position_gets_new_views_in_every_epoch_stage_and_seed():
    runs = {key: epoch_views(64, *key) for key in [(0, "tes", 0), (0, "tes", 1), (0, "get", 0), (1, "tes", 0)]}
    keys = list(runs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            # 33 x 33 x 2 = 2178 equally likely views: two independent draws agree about once
            # in 2178 times; the same stream would agree at all 128 views.
            same = sum(x == y for pa, pb in zip(runs[a], runs[b]) for x, y in zip(pa, pb))
            assert same <= 2, (a, b, same)
    # The two views of one sample are independent draws too.
    assert sum(v1 == v2 for v1, v2 in runs[keys[0]]) <= 2


def test_crops_and_flips_follow_the_transforms_own_distribution():
    # The first 10 positions of 40 (seed, stage, epoch) streams: 800 views. A stream that
    # repeated across epochs, stages or seeds would give 20 distinct views, 40 times each.
    seeded = [v for seed in range(5) for stage in ("tes", "get") for epoch in range(4)
              for sample in epoch_views(10, seed, stage, epoch) for v in sample]
    # The same transform drawing from one fresh generator, 800 times in a row.
    torch.manual_seed(20261204)
    fresh = [view_parameters(TRAIN_TRANSFORM(IMAGE)) for _ in range(len(seeded))]
    for field, bins in ((0, OFFSETS), (1, OFFSETS), (2, 2)):
        table = np.array([np.bincount([int(v[field]) for v in views], minlength=bins) for views in (seeded, fresh)])
        p_value = chi2_contingency(table)[1]
        assert p_value > ALPHA, (field, table)
    flips = sum(v[2] for v in seeded)
    assert binomtest(flips, len(seeded), 0.5).pvalue > ALPHA
    assert len(set(seeded)) > 500  # ~670 distinct of 2178 expected for 800 independent views


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_positions_draws_are_the_same_whatever_the_processes_and_workers(workers, world_size):
    """The values of every library at (seed, stage, epoch, position) do not depend on the
    process (rank of world_size) or loader worker that loads the sample."""
    def position_values(rank: int, world: int, num_workers: int) -> dict[int, torch.Tensor]:
        sampler = WeightedEpochSampler(torch.ones(16), batch_size=8, seed=3, rank=rank, world_size=world)
        sampler.set_epoch(1, stage="get")
        loader = DataLoader(SeededSamples(EveryLibrary()), sampler=sampler, batch_size=8 // world,
                            num_workers=num_workers, generator=torch.Generator())
        positions = sampler.positions().tolist()
        rows = [torch.cat(values[:3], dim=1) for values in loader]
        return dict(zip(positions, torch.cat(rows)))

    one = position_values(0, 1, 0)
    many = {}
    for rank in range(world_size):
        many.update(position_values(rank, world_size, workers))
    assert many.keys() == one.keys()
    assert all(torch.equal(many[p], one[p]) for p in one)
    # Distinct between positions, and between libraries within a sample.
    values = torch.stack(list(one.values()))
    assert len({tuple(row.tolist()) for row in values}) == len(values)
    assert not torch.isclose(values[:, 0], values[:, 2]).any()


def test_loading_a_sample_leaves_torchs_generator_as_it_was():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    SeededSamples(CoordinateViews(1))[(0, 12345)]
    assert torch.equal(torch.rand(3), expected)


def test_derived_seeds_are_full_entropy_hashes_of_their_key():
    seeds = [derive_seed(seed, stage, epoch) for seed in range(20) for stage in ("tes", "get")
             for epoch in range(100)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2 ** 32 for s in seeds)
    # Each of the 32 bits is set about half of the time.
    bits = np.array([[s >> b & 1 for b in range(32)] for s in seeds])
    for b in range(32):
        assert binomtest(int(bits[:, b].sum()), len(seeds), 0.5).pvalue > ALPHA / 32, b
    # A key that differs only in high bits (the old bug: epochs shifted above bit 32) still
    # gives a new seed, in the low 32 bits too.
    assert derive_seed(5) != derive_seed((7 << 32) + 5)
    assert derive_seed(5, bits=128) >> 96 == derive_seed(5)  # the same hash, more of it


def test_global_generators_get_streams_of_their_own():
    # torch's and NumPy's Mersenne Twisters seeded with one number give the same 32-bit words
    # (shifted by one); seed_everything gives each its own seed, and each run seed its own.
    def words(seed: int) -> tuple[set, set]:
        seed_everything(seed, "tes")
        torch_words = set(torch.randint(0, 2 ** 32, (50,), dtype=torch.int64).tolist())
        return torch_words, set(np.random.randint(0, 2 ** 32, 50, dtype=np.uint64).tolist())

    torch0, numpy0 = words(0)
    torch1, numpy1 = words(1)
    assert not torch0 & numpy0 and not torch1 & numpy1 and not torch0 & torch1 and not numpy0 & numpy1
    seed_everything(0, "tes")
    first = torch.rand(4)
    seed_everything(0, "get")
    assert not torch.equal(torch.rand(4), first)


def test_word_dropout_is_new_every_step_and_the_same_for_any_number_of_processes():
    rows = 16  # 2 views x 8 samples of one process

    def mask(epoch: int, step: int, seed: int = 0) -> torch.Tensor:
        return word_drop_mask(seed, 0.5, 7, DistInfo(), epoch, step, rows)

    masks = [mask(0, 0), mask(0, 1), mask(1, 0), mask(0, 0, seed=1)]
    assert all(not torch.equal(a, b) for i, a in enumerate(masks) for b in masks[i + 1:])
    assert torch.equal(mask(0, 0), mask(0, 0))
    # Two processes with half of the batch each: together (view 1 of both, then view 2) the
    # mask of one process.
    halves = [word_drop_mask(0, 0.5, 7, DistInfo(rank=r, world_size=2), 0, 0, rows // 2) for r in range(2)]
    views = [torch.cat([h[:4] for h in halves]), torch.cat([h[4:] for h in halves])]
    assert torch.equal(torch.cat(views), mask(0, 0))
    assert word_drop_mask(0, 0.0, 7, DistInfo(), 0, 0, rows) is None
