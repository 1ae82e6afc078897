"""What GET computes in each stage (docs/method.md): the losses, as pure functions on tensors,
and each stage's training step, which runs the model on a batch and takes its loss.

``methods.tes`` is stage 1 (the TES loss, ``TESStep``), ``methods.simgcd`` the per-branch SimGCD
loss and ``methods.get`` stage 2 (the total with CICO, ``GETStep``). Rows are the 2B rows of
both views (view 1 then view 2); labels are int64 [2B], labelled_mask bool [2B]. The caller
checks its arguments and calls the losses in float32 outside autocast. Every loss returns
``(total, components)``: ``total`` a 0-d tensor with its graph, ``components`` {name: detached
0-d tensor}, logged under their names without further code.
"""
from __future__ import annotations

import torch

Losses = tuple[torch.Tensor, dict[str, torch.Tensor]]


def graph_zero(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d zero still attached to ``tensor``'s graph, so an empty term can backward()."""
    return tensor.sum() * 0.0


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_i mask_i·values_i / max(Σ_i mask_i, 1) for values float [N], mask bool [N]."""
    # A weighted sum rather than values[mask]: no host sync, and an empty mask gives a
    # graph-attached 0 / 1 = 0 instead of NaN.
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)
