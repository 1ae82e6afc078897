"""GET losses as pure functions on tensors (GET_SPEC.md §3-§4).

- ``methods.tes``: stage 1, the Text Embedding Synthesizer loss (alignment + distillation).
- ``methods.simgcd``: the per-branch SimGCD recipe (CE, self-distillation, mean entropy,
  InfoNCE, SupCon) and its weighted sum.
- ``methods.get``: stage 2, cross-modal instance consistency (CICO) and the total GET loss.

Every loss returns ``(total, components)``: ``total`` is a 0-d tensor carrying the graph,
``components`` maps a name to a detached 0-d tensor for logging. This module holds the two
helpers they share: the precision policy and the check of the labelled-row arguments.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

import torch

LossFn = TypeVar("LossFn", bound=Callable[..., Any])


def _upcast(value: Any) -> Any:
    """Return a float32 copy of a half / bfloat16 tensor; anything else is returned as is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.element_size() < 4:
        return value.float()
    return value


def full_precision(loss_fn: LossFn) -> LossFn:
    """Run ``loss_fn`` in at least float32, outside any autocast region.

    Inside a bf16 autocast region even a float32 matmul or softmax would be computed in bf16;
    with a logit scale of 100 (stage 1) or temperatures of 0.07 / 0.1 that rounding moves the
    logits by tenths. So the wrapped loss sees its half-precision tensor arguments upcast to
    float32 (float32 / float64 are kept) and runs with autocast disabled on their devices.
    Gradients flow back through the upcast to the original dtype.
    """

    @functools.wraps(loss_fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_upcast(a) for a in args)
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        device_types = {
            v.device.type
            for v in (*args, *kwargs.values())
            if isinstance(v, torch.Tensor) and torch.amp.is_autocast_available(v.device.type)
        }
        with contextlib.ExitStack() as stack:
            for device_type in sorted(device_types):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            return loss_fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_labelled_rows(n_rows: int, labels: torch.Tensor, labelled_mask: torch.Tensor) -> None:
    """Raise a ValueError unless ``labels`` is an integer [n_rows] tensor and
    ``labelled_mask`` a bool [n_rows] tensor (both views stacked, view 1 then view 2)."""
    if labels.shape != (n_rows,) or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer tensor of shape [{n_rows}] (one label per row of both "
            f"views, repeated like torch.cat(views)), got dtype {labels.dtype} shape "
            f"{tuple(labels.shape)}"
        )
    if labelled_mask.shape != (n_rows,) or labelled_mask.dtype != torch.bool:
        raise ValueError(
            f"labelled_mask must be a bool tensor of shape [{n_rows}] (is_labelled repeated for "
            f"both views), got dtype {labelled_mask.dtype} shape {tuple(labelled_mask.shape)}; "
            "convert it with `.bool()` and repeat it with `torch.cat([mask, mask])`"
        )


def graph_zero(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d zero that is still attached to ``tensor``'s graph (so ``backward()`` works when a
    term is empty, e.g. a batch without labelled rows). Same dtype / device as ``tensor``."""
    return tensor.sum() * 0.0
