"""The samplers of data/samplers.py: the weighted draw of one process, the same global
batches shared out between processes, per-sample augmentation seeds, mid-epoch resume."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from data.samplers import ShardSampler, WeightedEpochSampler

WEIGHTS = torch.tensor([1.0] * 10 + [0.25] * 41, dtype=torch.float64)  # 10 labelled, 41 unlabelled


def draw(sampler, epoch: int, skip: int = 0, stage: str = "tes") -> list[tuple[int, int]]:
    sampler.set_epoch(epoch, skip=skip, stage=stage)
    return list(sampler)


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def test_one_process_is_weighted_random_sampler_with_the_epoch_generator():
    sampler = WeightedEpochSampler(WEIGHTS, batch_size=8, seed=3)
    for stage, epoch in (("tes", 0), ("tes", 1), ("get", 7)):
        indices = [index for index, _ in draw(sampler, epoch, stage=stage)]
        gen = torch.Generator().manual_seed(sampler.draw_seed())
        expected = list(WeightedRandomSampler(WEIGHTS, 51, replacement=True, generator=gen))
        assert indices == expected[:48]  # 6 whole batches of 8; the last 3 are dropped


def test_every_epoch_of_every_stage_and_seed_draws_its_own_batches():
    def indices(seed: int, stage: str, epoch: int) -> list[int]:
        return [index for index, _ in draw(WeightedEpochSampler(WEIGHTS, 8, seed=seed), epoch, stage=stage)]

    # 48 draws from 51 indices: two independent epochs agree on about 1/51 of the positions.
    streams = [indices(seed, stage, epoch) for seed in (0, 1) for stage in ("tes", "get") for epoch in (0, 1)]
    for i, a in enumerate(streams):
        for b in streams[i + 1:]:
            assert sum(x == y for x, y in zip(a, b)) < 8, (a, b)


@pytest.mark.parametrize("world_size", [2, 4])
def test_processes_share_out_the_same_global_batches(world_size):
    single = batches(draw(WeightedEpochSampler(WEIGHTS, 8, seed=0), epoch=2), 8)
    shards = [batches(draw(WeightedEpochSampler(WEIGHTS, 8, 0, r, world_size), epoch=2), 8 // world_size)
              for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # every process runs the same number of steps
    for step, global_batch in enumerate(single):
        assert sum((shard[step] for shard in shards), []) == global_batch  # indices and seeds


def test_a_size_that_used_to_give_unequal_shards_gives_equal_steps():
    # 27 samples over 2 processes used to be shards of 14 and 13: with 7 per step, 2 steps on
    # one process and 1 on the other, and the collectives of the extra step never returned.
    weights = torch.ones(27, dtype=torch.float64)
    lengths = [len(WeightedEpochSampler(weights, 14, 0, r, 2)) for r in range(2)]
    assert lengths == [7, 7]


def test_augmentation_seeds_are_new_for_every_seed_stage_epoch_and_position():
    seeds = [seed for _, seed in draw(WeightedEpochSampler(WEIGHTS, 8, seed=0), epoch=0)]
    assert len(set(seeds)) == len(seeds)  # a sample drawn twice is augmented twice differently
    assert all(0 <= seed < 2 ** 64 for seed in seeds)
    for seed, stage, epoch in ((0, "tes", 1), (0, "get", 0), (1, "tes", 0)):
        other = [s for _, s in draw(WeightedEpochSampler(WEIGHTS, 8, seed=seed), epoch, stage=stage)]
        assert not set(other) & set(seeds)
        # Different in the low 32 bits (torch's CPU generator) and the high ones (NumPy's).
        assert not {s & 0xFFFFFFFF for s in other} & {s & 0xFFFFFFFF for s in seeds}
        assert not {s >> 32 for s in other} & {s >> 32 for s in seeds}


def test_labelled_and_unlabelled_are_balanced_in_expectation():
    sampler = WeightedEpochSampler(WEIGHTS, 51, seed=0)
    labelled = sum(sum(i < 10 for i, _ in draw(sampler, e)) for e in range(200))
    assert abs(labelled / (200 * 51) - 0.5) < 0.02  # total weight 10 vs 41 * 0.25 = 10.25


def test_skip_resumes_mid_epoch_and_len_follows():
    sampler = WeightedEpochSampler(WEIGHTS, 8, seed=1, rank=1, world_size=2)
    full = draw(sampler, 4)
    assert draw(sampler, 4, skip=8) == full[8:]
    assert len(sampler) == len(full) - 8


def test_global_batch_must_divide_among_the_processes():
    with pytest.raises(ValueError, match="--batch_size"):
        WeightedEpochSampler(WEIGHTS, 9, seed=0, rank=0, world_size=2)


def test_shards_for_evaluation_cover_each_index_once():
    shards = [list(ShardSampler(11, r, 4)) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(11))
