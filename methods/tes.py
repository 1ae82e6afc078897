"""Stage-1 loss of the Text Embedding Synthesizer (TES), GET_SPEC.md §3.

Only the TES projector trains; CLIP is frozen. For a batch of 2B rows (view 1 then view 2):
f = CLIP image embeddings [2B, 512], t = pseudo text embeddings [2B, 512] produced by the TES.

    loss = L_align + L_distill,   L_distill = distill_ce + distill_mse

Used by the stage-1 training loop as
``tes_loss(f, t, clip.logit_scale.exp(), labels, labelled_mask, class_text)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods import check_labelled_rows, full_precision

Losses = tuple[torch.Tensor, dict[str, torch.Tensor]]


def _check_embeddings(name: str, x: torch.Tensor, rows: int | None = None) -> None:
    """Raise unless ``x`` is a float [rows, D] matrix (any row count when ``rows`` is None)."""
    if x.dim() != 2 or not x.is_floating_point() or (rows is not None and x.shape[0] != rows):
        expected = f"[{rows}, D]" if rows is not None else "[N, D]"
        raise ValueError(
            f"{name} must be a float tensor of shape {expected}, got dtype {x.dtype} shape "
            f"{tuple(x.shape)}"
        )


@full_precision
def tes_alignment_loss(
    f: torch.Tensor, t: torch.Tensor, logit_scale: float | torch.Tensor
) -> Losses:
    """CLIP-style symmetric alignment of image and pseudo-text embeddings.

    f, t: float [2B, D], not normalised (normalised here). ``logit_scale`` is the already
    exponentiated CLIP scale: the caller passes ``clip.logit_scale.exp()`` (100 for the OpenAI
    weights), a float or a 0-d tensor. With L = logit_scale · norm(f) norm(t)ᵀ [2B, 2B]:
    loss = CE(L, arange) + CE(Lᵀ, arange), the SUM of both directions, each a mean over rows.
    Components: ``align``.
    """
    _check_embeddings("f", f)
    _check_embeddings("t", t, rows=f.shape[0])
    logits = logit_scale * F.normalize(f, dim=1) @ F.normalize(t, dim=1).T
    targets = torch.arange(f.shape[0], device=f.device)
    loss = F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)
    return loss, {"align": loss.detach()}


@full_precision
def tes_distill_loss(
    t: torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    class_text: torch.Tensor,
) -> Losses:
    """Distil the pseudo text of labelled rows towards the CLIP text of their class.

    t: float [2B, D] pseudo text embeddings (normalised here); labels: int64 [2B], remapped so
    old class i is row i of ``class_text`` (values of unlabelled rows are ignored);
    labelled_mask: bool [2B]; class_text: float [K_old, D], normalised CLIP text embeddings of
    "a photo of a {name}" (normalised again here, a no-op for a normalised table).
    Over the M labelled rows:
    distill_ce = mean CE of norm(t) class_textᵀ (temperature 1) with the label;
    distill_mse = Σ_i ‖norm(t_i) - class_text[y_i]‖² / M.
    No labelled row gives graph-attached zeros. Returns (distill_ce + distill_mse,
    {``distill_ce``, ``distill_mse``}).
    """
    check_labelled_rows(t.shape[0], labels, labelled_mask)
    _check_embeddings("t", t)
    if class_text.dim() != 2 or class_text.shape[1] != t.shape[1]:
        raise ValueError(
            f"class_text must be [K_old, {t.shape[1]}] (one normalised text embedding per old "
            f"class), got shape {tuple(class_text.shape)}"
        )
    text = F.normalize(t, dim=1)
    class_text = F.normalize(class_text.to(text.dtype), dim=1)
    # Masked means over all rows instead of boolean indexing: no host sync and an empty
    # labelled set gives 0 / 1 = 0 rather than NaN. Unlabelled rows get placeholder class 0.
    safe_labels = torch.where(labelled_mask, labels, torch.zeros_like(labels))
    weights = labelled_mask.to(text.dtype)
    n_labelled = weights.sum().clamp(min=1.0)
    ce_rows = F.cross_entropy(text @ class_text.T, safe_labels, reduction="none")
    mse_rows = (text - class_text[safe_labels]).pow(2).sum(dim=1)
    distill_ce = (ce_rows * weights).sum() / n_labelled
    distill_mse = (mse_rows * weights).sum() / n_labelled
    components = {"distill_ce": distill_ce.detach(), "distill_mse": distill_mse.detach()}
    return distill_ce + distill_mse, components


def tes_loss(
    f: torch.Tensor,
    t: torch.Tensor,
    logit_scale: float | torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    class_text: torch.Tensor,
) -> Losses:
    """Total stage-1 loss: align + distill_ce + distill_mse.

    f, t: float [2B, D] (image / pseudo text embeddings, not normalised); logit_scale: the
    exponentiated CLIP scale (``clip.logit_scale.exp()``); labels: int64 [2B]; labelled_mask:
    bool [2B]; class_text: float [K_old, D]. Components: ``align``, ``distill_ce``,
    ``distill_mse``.
    """
    align, align_parts = tes_alignment_loss(f, t, logit_scale)
    distill, distill_parts = tes_distill_loss(t, labels, labelled_mask, class_text)
    return align + distill, {**align_parts, **distill_parts}
