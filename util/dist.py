"""Distributed helpers for ``torchrun``: process-group set-up, DDP, and the collectives that
make N processes compute what one process computes (the global batch's rows, the gathered
predictions, one answer for all).

A single process is the special case ``world_size == 1``: every helper is then a no-op, so
the same code runs with one GPU or several.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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


def launched_world_size() -> int:
    """Processes of this run (torchrun sets WORLD_SIZE), known before they connect."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NCCL on CUDA, Gloo on CPU; each process of a CUDA run uses the GPU of its local rank.
    Without ``torchrun`` (no ``WORLD_SIZE``) this is a no-op.
    """
    world_size = launched_world_size()
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


class _GatherRows(torch.autograd.Function):
    """all_gather with a gradient, on any backend: [n, ...] -> [world_size, n, ...]; the
    backward sums every process's gradient of the result and keeps this process's part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_views(batch: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """The rows of the global batch on every process, in one process's order.

    Each tensor holds this process's 2b rows (view 1 then view 2 of its b samples); each
    result holds the 2B = 2·world_size·b rows of the global batch: view 1 of the samples of
    every process in rank order, then view 2, which is what one process has for that batch.
    Every process then computes the loss of the whole batch; float tensors keep their
    gradient, whose backward sums the processes' gradients, so that after DDP's average
    each parameter has the one-process gradient. Labels and masks come along (no gradient).
    """
    if not info.enabled:
        return batch
    rows = next(iter(batch.values())).shape[0]
    columns = [value.reshape(rows, -1).float() for value in batch.values()]  # exact for labels
    gathered = _GatherRows.apply(torch.cat(columns, dim=1))                  # [N, 2b, D]
    n, _, width = gathered.shape
    # [N, view, b, D] -> [view, N, b, D]: view-major, then rank order.
    global_rows = gathered.view(n, 2, rows // 2, width).transpose(0, 1).reshape(n * rows, width)
    parts = global_rows.split([c.shape[1] for c in columns], dim=1)
    return {key: part.reshape(n * rows, *value.shape[1:]).to(value.dtype)
            for (key, value), part in zip(batch.items(), parts)}


def local_rows(global_rows: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This process's rows of a tensor over the 2B rows of the global batch (in the order of
    ``gather_views``: view 1 of every process's samples in rank order, then view 2): the rows
    that ``gather_views`` would put there from this process."""
    if not info.enabled:
        return global_rows
    return global_rows.view(2, info.world_size, -1, *global_rows.shape[1:])[:, info.rank].flatten(0, 1)


def gather_predictions(local: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """Concatenate per-rank 1-D CPU tensors from every rank (ordered by the ``index`` entry).

    ``local`` must hold an ``index`` tensor (dataset positions) next to the predictions; the
    result is sorted by it, so it equals a single-process evaluation in sample order.
    """
    if info.enabled:
        parts: list = [None] * info.world_size
        dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
        keys = max((part.keys() for part in parts), key=len)  # a process without samples has fewer
        local = {k: torch.cat([part[k] for part in parts if k in part]) for k in keys}
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
