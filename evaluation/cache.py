"""The evaluation cache of stage 2: the outputs of the frozen blocks and of the TES for the
evaluation images, computed once and reused by every later evaluation (see ``EvalCache``)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from evaluation.predict import Batch, frozen_batches
from util.logging_utils import get_logger


class EvalCache:
    """The frozen part's outputs (``GETModel.frozen_part``) of an evaluation split, batch by
    batch, from the first evaluation of stage 2 on: under the test transform they never change
    while the model trains, so later evaluations run only the trainable blocks, the text
    mapping and the heads, and load no image. Up to ``budget`` bytes (on the GPU when they fit
    in half its free memory, else in host memory); the batches beyond are computed as before.
    In memory only: a resumed run builds it again."""

    def __init__(self, name: str, budget: int):
        self.name, self.budget = name, budget
        # ((tokens, tes_out), targets, uq_idx); a single-branch model's frozen part has a None
        self.batches: list[tuple[tuple[Tensor | None, Tensor | None], Tensor, Tensor]] = []
        self.built, self.full, self.size, self.device = False, False, 0, None
        self.rest: DataLoader | None = None  # the split's uncached batches, once built

    def batches_of(self, model, loader: DataLoader, device: torch.device) -> Iterator[Batch]:
        """Every batch of ``loader``, in order, as ((tokens, tes_out), targets, uq_idx)."""
        if not self.built:
            self.batches, self.full, self.size = [], False, 0
            yield from self._build(model, loader, device)
            return
        for frozen, targets, uq_idx in self.batches:
            yield tuple(moved(t, device) for t in frozen), targets, uq_idx
        yield from frozen_batches(model, self.rest or [], device)

    def _build(self, model, loader: DataLoader, device: torch.device) -> Iterator[Batch]:
        for batch in frozen_batches(model, loader, device):
            self._store(batch, device)
            yield batch
        self.built = True
        cached = sum(len(batch[1]) for batch in self.batches)
        self.rest = rest_of(loader, cached)
        get_logger().info("evaluation cache of %s: %d of %d images, %.2f GiB in %s memory; later "
                          "evaluations skip the frozen blocks and the TES", self.name, cached,
                          len(loader.sampler), self.size / 2**30, self.device or "no")

    def _store(self, batch: Batch, device: torch.device) -> None:
        frozen, targets, uq_idx = batch
        size = sum(t.nbytes for t in frozen if t is not None)
        if self.full or self.size + size > self.budget:
            self.full = True  # the cache stays a prefix of the split's batches
            return
        if self.device is None:
            on_gpu = device.type == "cuda" and self.budget <= torch.cuda.mem_get_info(device)[0] / 2
            self.device = device if on_gpu else torch.device("cpu")
        pinned = self.device.type == "cpu" and device.type == "cuda"  # pinned: copied back asynchronously
        stored = tuple(t if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) if pinned
                       else t.to(self.device) for t in frozen)
        self.batches.append((stored, targets, uq_idx))
        self.size += size


def moved(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    return None if tensor is None else tensor.to(device, non_blocking=True)


def rest_of(loader: DataLoader, skip: int) -> DataLoader | None:
    """The batches of ``loader`` after its first ``skip`` samples (None when there are none)."""
    indices = list(loader.sampler)[skip:]
    if not indices:
        return None
    return DataLoader(Subset(loader.dataset, indices), batch_size=loader.batch_size,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      persistent_workers=loader.persistent_workers)
