"""Distributed helpers for ``torchrun``: process-group set-up, the training sampler and the
gathering of evaluation predictions.

A single process is the special case ``world_size == 1``: the same sampler and evaluation
code run, so single-GPU and multi-GPU runs draw the same batches for the same seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, device: str) -> str:
        """The device of this process: under torchrun, CUDA means the GPU of its local rank."""
        return f"cuda:{self.local_rank}" if self.enabled and device.startswith("cuda") else device


def init_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NCCL on CUDA, Gloo on CPU; each process of a CUDA run uses the GPU of its local rank.
    Without ``torchrun`` (no ``WORLD_SIZE``) this is a no-op.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def wrap_ddp(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when several processes run, else itself."""
    if not info.enabled:
        return module
    cuda = next(module.parameters()).device.type == "cuda"
    # The models' buffers (attention masks, token ids, the heads' fixed norms) never change:
    # no need to broadcast them before every forward.
    return DistributedDataParallel(module, device_ids=[info.local_rank] if cuda else None,
                                   broadcast_buffers=False)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class WeightedEpochSampler(Sampler[int]):
    """The GCD training sampler, shardable across processes.

    Each epoch draws ``num_samples`` indices with replacement in proportion to ``weights``
    (labelled samples weight 1, unlabelled ones n_labelled / n_unlabelled), as
    ``WeightedRandomSampler`` does, from a generator seeded by ``(seed, epoch)`` and so
    identical on every rank; rank r then takes every world_size-th index starting at r. With
    one process this is exactly ``WeightedRandomSampler`` with that generator.
    """

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.weights = weights.double()
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's draw; ``skip`` drops this rank's first indices, so a run resumed
        mid-epoch sees exactly the batches it had not trained on yet."""
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draw = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=gen)
        return iter(draw[self.rank::self.world_size][self.skip:].tolist())

    def __len__(self) -> int:
        return max(0, len(range(self.rank, self.num_samples, self.world_size)) - self.skip)


class ShardSampler(Sampler[int]):
    """Every world_size-th index from ``rank``, in order, without padding: the shards of all
    ranks together cover the dataset exactly once (evaluation must neither drop nor repeat)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, n, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def gather_predictions(local: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """Concatenate per-rank 1-D CPU tensors from every rank (ordered by the ``index`` entry).

    ``local`` must hold an ``index`` tensor (dataset positions) next to the predictions; the
    result is sorted by it, so it equals a single-process evaluation in sample order.
    """
    if info.enabled:
        parts: list = [None] * info.world_size
        dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
        local = {k: torch.cat([p[k] for p in parts]) for k in local}
    order = torch.argsort(local["index"])
    return {k: v[order] for k, v in local.items()}


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (e.g. the run folder name, which holds a timestamp)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(*flags: bool, device: torch.device) -> tuple[bool, ...]:
    """Each flag, true on every rank if it is true on any rank (one all-reduce for all)."""
    if not dist.is_initialized():
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())
