"""The training sampler of util/dist.py: the weighted draw of one process, shared out
between processes, reproducible per epoch, and resumable mid-epoch."""
from __future__ import annotations

import torch
from torch.utils.data import WeightedRandomSampler

from util.dist import ShardSampler, WeightedEpochSampler

WEIGHTS = torch.tensor([1.0] * 10 + [0.25] * 40, dtype=torch.float64)  # 10 labelled, 40 unlabelled


def draw(sampler, epoch: int, skip: int = 0) -> list[int]:
    sampler.set_epoch(epoch, skip=skip)
    return list(sampler)


def test_one_process_is_weighted_random_sampler_with_the_epoch_generator():
    sampler = WeightedEpochSampler(WEIGHTS, num_samples=50, seed=3)
    for epoch in (0, 1, 7):
        gen = torch.Generator().manual_seed(3 * 100_003 + epoch)
        expected = list(WeightedRandomSampler(WEIGHTS, 50, replacement=True, generator=gen))
        assert draw(sampler, epoch) == expected
    assert draw(sampler, 0) != draw(sampler, 1)  # reshuffled every epoch


def test_ranks_share_out_the_single_process_draw():
    single = draw(WeightedEpochSampler(WEIGHTS, 50, seed=0), epoch=2)
    shards = [draw(WeightedEpochSampler(WEIGHTS, 50, seed=0, rank=r, world_size=3), epoch=2)
              for r in range(3)]
    assert [len(s) for s in shards] == [17, 17, 16]
    interleaved = [shards[i % 3][i // 3] for i in range(50)]
    assert interleaved == single


def test_labelled_and_unlabelled_are_balanced_in_expectation():
    sampler = WeightedEpochSampler(WEIGHTS, 50, seed=0)
    labelled = sum(sum(i < 10 for i in draw(sampler, e)) for e in range(200))
    assert abs(labelled / (200 * 50) - 0.5) < 0.02  # total weight 10 vs 40 * 0.25 = 10


def test_skip_resumes_mid_epoch_and_len_follows():
    sampler = WeightedEpochSampler(WEIGHTS, 50, seed=1, rank=1, world_size=2)
    full = draw(sampler, 4)
    assert draw(sampler, 4, skip=8) == full[8:]
    assert len(sampler) == len(full) - 8


def test_shards_for_evaluation_cover_each_index_once():
    shards = [list(ShardSampler(11, r, 4)) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(11))
