"""Per-branch losses of GET stage 2: the SimGCD recipe (GET_SPEC.md §4, "Precise definitions").

Both branches (visual, text) use ``branch_loss`` on their own class logits ``s`` [2B, K] and
projections ``z`` [2B, d]; rows are view 1 of the batch followed by view 2 and ``labels`` /
``labelled_mask`` are [2B] (repeated for both views). ``methods.get.get_loss`` calls it twice.

    total = (1-λ)·(self_distill + memax_weight·memax) + λ·cls + (1-λ)·info_nce + λ·supcon

with λ = ``sup_weight`` = 0.35. Every function returns ``(total, {name: detached value})`` and
runs in at least float32 outside autocast (see ``methods.full_precision``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from methods import check_labelled_rows, full_precision, graph_zero

Losses = tuple[torch.Tensor, dict[str, torch.Tensor]]


def teacher_temperature(
    epoch: int, warmup_temp: float = 0.07, final_temp: float = 0.04, warmup_epochs: int = 30
) -> float:
    """Teacher temperature τ_t of self-distillation at ``epoch`` (0-based).

    ``np.linspace(warmup_temp, final_temp, warmup_epochs)[epoch]`` while ``epoch <
    warmup_epochs`` (so 0.07 - 0.03·e/29 with the defaults, reaching 0.04 at e = 29), then
    ``final_temp``.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0 (0-based epoch counter), got {epoch}")
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_temp, final_temp, warmup_epochs)[epoch])
    return float(final_temp)


@full_precision
def supervised_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    temperature: float = 0.1,
) -> Losses:
    """Cross-entropy of ``logits / temperature`` on the labelled rows, mean over them.

    logits: float [2B, K]; labels: int64 [2B] (values of unlabelled rows are ignored);
    labelled_mask: bool [2B]. No labelled row gives a graph-attached 0.
    Components: ``cls``.
    """
    check_labelled_rows(logits.shape[0], labels, labelled_mask)
    # A masked mean over all rows instead of boolean indexing: no host sync, and an empty
    # labelled set gives 0 / 1 = 0 (still attached to the graph) instead of NaN. Unlabelled
    # rows may carry any label (e.g. -1), so they get a placeholder class 0.
    safe_labels = torch.where(labelled_mask, labels, torch.zeros_like(labels))
    per_row = F.cross_entropy(logits / temperature, safe_labels, reduction="none")
    weights = labelled_mask.to(per_row.dtype)
    loss = (per_row * weights).sum() / weights.sum().clamp(min=1.0)
    return loss, {"cls": loss.detach()}


def _check_views(n_rows: int, n_views: int) -> None:
    """Raise unless the ``n_rows`` rows split into ``n_views`` equal chunks (views stacked)."""
    if n_views < 2 or n_rows % n_views != 0:
        raise ValueError(
            f"expected the rows to be n_views >= 2 views stacked with torch.cat(views, dim=0); "
            f"got {n_rows} rows for n_views={n_views}"
        )


@full_precision
def self_distillation(
    logits: torch.Tensor, teacher_temp: float, n_views: int = 2, student_temp: float = 0.1
) -> Losses:
    """Cross-view self-distillation (DINO-style, no centering).

    logits: float [n_views·B, K], view 1 rows then view 2 rows. Teacher =
    softmax(logits.detach() / teacher_temp), student = log_softmax(logits / student_temp), both
    chunked per view. For every ordered pair of different views (a, b), the term is the mean over
    rows of -Σ_k teacher_a · log student_b; the loss is the mean of these terms.
    ``teacher_temp`` comes from ``teacher_temperature(epoch)``. Components: ``self_distill``.
    """
    _check_views(logits.shape[0], n_views)
    teacher = F.softmax(logits.detach() / teacher_temp, dim=1).chunk(n_views)
    student = F.log_softmax(logits / student_temp, dim=1).chunk(n_views)
    terms = [
        -(teacher[a] * student[b]).sum(dim=1).mean()
        for a in range(n_views)
        for b in range(n_views)
        if a != b
    ]
    loss = torch.stack(terms).mean()
    return loss, {"self_distill": loss.detach()}


@full_precision
def mean_entropy_regulariser(logits: torch.Tensor, temperature: float = 0.1) -> Losses:
    """``log K - H(p̄)`` with p̄ = mean over all rows of softmax(logits / temperature).

    logits: float [N, K]. The value is 0 for a uniform p̄ and log K for a one-hot p̄, so ADDING
    ``memax_weight`` times it to the loss pushes the mean prediction towards uniform (maximises
    its entropy), which keeps every cluster in use. 0·log 0 is taken as 0; the log is clamped so
    a probability that underflows to 0 gives neither NaN values nor NaN gradients.
    Components: ``memax``.
    """
    mean_probs = F.softmax(logits / temperature, dim=1).mean(dim=0)
    tiny = torch.finfo(mean_probs.dtype).tiny
    entropy = -(mean_probs * torch.log(mean_probs.clamp_min(tiny))).sum()
    loss = math.log(logits.shape[1]) - entropy
    return loss, {"memax": loss.detach()}


def _multi_positive_nce(
    z: torch.Tensor, groups: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor contrastive loss shared by InfoNCE and SupCon.

    z: float [N, d] (N >= 2, normalised here); groups: int [N], rows of one group are positives
    of each other. With s = ẑ ẑᵀ / temperature, anchor i's loss is
    -mean over positives p of log(exp(s_ip) / Σ_{a≠i} exp(s_ia)).
    Returns (loss [N], has_positive bool [N]); anchors without a positive have loss 0.
    """
    z = F.normalize(z, dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    log_denominator = torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1)
    log_prob = sim - log_denominator[:, None]
    positives = (groups[:, None] == groups[None, :]) & ~self_mask
    n_positives = positives.sum(dim=1)
    # where() rather than a product keeps non-positive entries out of the sum entirely.
    summed = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -summed / n_positives.clamp(min=1), n_positives > 0


@full_precision
def info_nce(z: torch.Tensor, n_views: int = 2, temperature: float = 1.0) -> Losses:
    """Unsupervised SimCLR-style InfoNCE over the stacked views.

    z: float [n_views·B, d], view 1 rows then view 2 rows (normalised here). Logits are cosine
    similarities / temperature; for row i the positive is the same sample's other view, the
    negatives the other 2B-2 rows, row i itself is excluded; CE averaged over all 2B rows.
    (With n_views > 2, each row averages -log softmax over its n_views-1 positives.)
    Components: ``info_nce``.
    """
    _check_views(z.shape[0], n_views)
    batch = z.shape[0] // n_views
    sample_ids = torch.arange(batch, device=z.device).repeat(n_views)
    per_row, _ = _multi_positive_nce(z, sample_ids, temperature)
    loss = per_row.mean()
    return loss, {"info_nce": loss.detach()}


@full_precision
def supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> Losses:
    """Supervised contrastive loss (Khosla et al.) on the labelled rows only.

    z: float [M, d], the projections of the labelled rows of both views (normalised here);
    labels: int [M]. With s = ẑ ẑᵀ / temperature, anchor i's loss is
    -(temperature / base_temperature) · mean over positives p (same label, p ≠ i) of
    log(exp(s_ip) / Σ_{a≠i} exp(s_ia)); the loss is the mean over anchors with at least one
    positive. Fewer than two rows, or no positive pair at all, gives a graph-attached 0.
    Components: ``supcon``.
    """
    if labels.shape != (z.shape[0],):
        raise ValueError(
            f"supcon expects one label per row of z: z has {z.shape[0]} rows, labels shape "
            f"{tuple(labels.shape)}; pass z[labelled_mask] and labels[labelled_mask]"
        )
    if z.shape[0] < 2:
        loss = graph_zero(z)
    else:
        per_anchor, has_positive = _multi_positive_nce(z, labels, temperature)
        scale = temperature / base_temperature
        # A sum over anchors with a positive divided by their count (>= 1): no host sync needed.
        loss = scale * (per_anchor * has_positive).sum() / has_positive.sum().clamp(min=1)
    return loss, {"supcon": loss.detach()}


def branch_loss(
    logits: torch.Tensor,
    z: torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    teacher_temp: float,
    sup_weight: float = 0.35,
    memax_weight: float = 1.0,
    n_views: int = 2,
    student_temp: float = 0.1,
    info_nce_temp: float = 1.0,
    supcon_temp: float = 0.07,
) -> Losses:
    """The SimGCD loss of one branch.

    logits: float [2B, K] class logits; z: float [2B, d] head projections; labels: int64 [2B];
    labelled_mask: bool [2B]. With λ = sup_weight:
    total = (1-λ)(self_distill + memax_weight·memax) + λ·cls + (1-λ)·info_nce + λ·supcon.
    Components: ``cls``, ``self_distill``, ``memax`` (unweighted), ``info_nce``, ``supcon``.
    """
    check_labelled_rows(logits.shape[0], labels, labelled_mask)
    if z.shape[0] != logits.shape[0]:
        raise ValueError(
            f"z and logits must have the same rows (both views stacked), got {z.shape[0]} and "
            f"{logits.shape[0]}"
        )
    cls, _ = supervised_ce(logits, labels, labelled_mask, temperature=student_temp)
    distill, _ = self_distillation(logits, teacher_temp, n_views=n_views, student_temp=student_temp)
    memax, _ = mean_entropy_regulariser(logits, temperature=student_temp)
    unsup_con, _ = info_nce(z, n_views=n_views, temperature=info_nce_temp)
    sup_con, _ = supcon(z[labelled_mask], labels[labelled_mask], temperature=supcon_temp)
    unsup_weight = 1.0 - sup_weight
    total = (
        unsup_weight * (distill + memax_weight * memax)
        + sup_weight * cls
        + unsup_weight * unsup_con
        + sup_weight * sup_con
    )
    components = {
        "cls": cls,
        "self_distill": distill,
        "memax": memax,
        "info_nce": unsup_con,
        "supcon": sup_con,
    }
    return total, {name: value.detach() for name, value in components.items()}
