"""How training and evaluation go through a dataset: the weighted draw of the training batches
(the same global batches whatever the number of processes), the per-sample seeding of their
augmentations, and the evaluation shards."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from util.rng import derive_seed, sample_seeds, seed_sample


class WeightedEpochSampler(Sampler[tuple[int, int]]):
    """The GCD training sampler: the same global batches whatever the number of processes.

    Each epoch of each stage draws ``len(weights)`` indices with replacement in proportion to
    ``weights`` (labelled samples weight 1, unlabelled ones n_labelled / n_unlabelled), as
    ``WeightedRandomSampler`` does, from a generator seeded by (seed, stage, epoch), so
    identical on every process and new in every epoch of every stage. Global batch i is
    draw[i·B : (i+1)·B] (the incomplete last batch is dropped); process r takes the r-th of
    its world_size equal slices, so every process runs the same number of steps and the slices
    of all processes, in rank order, are one process's batch.

    Items are ``(index, sample_seed)``: the 64-bit seed of the sample's augmentation, an
    independent random number for every (seed, stage, epoch, position in the draw), whichever
    process or loader worker loads it (see ``data.loaders.SeededSamples``).
    """

    def __init__(self, weights: torch.Tensor, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        """batch_size: the global batch B, a multiple of world_size."""
        if batch_size % world_size:
            raise ValueError(f"the global batch {batch_size} must be divisible by the "
                             f"{world_size} processes (flag --batch_size)")
        self.weights = weights.double()
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.stage, self.epoch, self.skip = "", 0, 0

    def set_epoch(self, epoch: int, skip: int = 0, stage: str = "") -> None:
        """Select the draw of ``epoch`` of ``stage``; ``skip`` drops this process's first
        samples, so a run resumed mid-epoch sees exactly the batches it had not trained on yet."""
        self.stage, self.epoch, self.skip = stage, epoch, skip

    def draw_seed(self) -> int:
        """The seed of the generator that draws the indices of the selected epoch."""
        return derive_seed(self.seed, self.stage, self.epoch, "draw")

    def positions(self) -> torch.Tensor:
        """This process's positions in the epoch's draw, in order (before ``skip``)."""
        steps = len(self.weights) // self.batch_size
        per_rank = self.batch_size // self.world_size
        return torch.arange(steps * self.batch_size).view(steps, self.world_size, per_rank)[:, self.rank].flatten()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draw = torch.multinomial(self.weights, len(self.weights), replacement=True,
                                 generator=torch.Generator().manual_seed(self.draw_seed()))
        seeds = sample_seeds(len(self.weights), self.seed, self.stage, self.epoch, "augment")
        positions = self.positions()[self.skip:]
        return zip(draw[positions].tolist(), seeds[positions.numpy()].tolist())

    def __len__(self) -> int:
        return max(0, len(self.positions()) - self.skip)


class ShardSampler(Sampler[int]):
    """Every world_size-th index from ``rank``, in order, without padding: the shards of all
    ranks together cover the dataset exactly once (evaluation must neither drop nor repeat)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, n, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSamples(Dataset):
    """``dataset[index]`` for the sampler's ``(index, seed)`` items, with every global
    generator an augmentation can draw from (torch's CPU one, NumPy's, Python's) seeded from
    ``seed`` while the sample is loaded (``util.rng.seed_sample``): its augmentation depends on
    the sample's seed alone, not on the process or loader worker that loads it.

    torch's generator is given back to the caller as it was; NumPy's and Python's are left
    seeded (restoring them costs ten times the seeding, and nothing in a training step draws
    from them)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        state = torch.get_rng_state()
        seed_sample(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)
