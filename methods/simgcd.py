"""Per-branch loss of GET stage 2, the SimGCD recipe (docs/method.md, "Stage 2").

    total = (1-λ)·(self_distill + memax_weight·memax) + λ·cls + (1-λ)·info_nce + λ·supcon

with λ = sup_weight = 0.35; logits s [2B, K], head projections z [2B, d].
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from methods import Losses, graph_zero, masked_mean


def teacher_temperature(
    epoch: int, warmup_temp: float = 0.07, final_temp: float = 0.04, warmup_epochs: int = 30
) -> float:
    """τ_t(e) = linspace(warmup_temp, final_temp, warmup_epochs)[e] for the 0-based epoch
    e < warmup_epochs (0.07 − 0.03·e/29 with the defaults), then final_temp."""
    if epoch < 0:  # a negative index would silently read the end of the linspace
        raise ValueError(f"epoch must be >= 0 (0-based epoch counter), got {epoch}")
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_temp, final_temp, warmup_epochs)[epoch])
    return float(final_temp)


def supervised_ce(
    logits: torch.Tensor, labels: torch.Tensor, labelled_mask: torch.Tensor,
    temperature: float = 0.1,
) -> Losses:
    """cls = CE(s / temperature, y), mean over the labelled rows (0 if none); s [2B, K]."""
    safe_labels = labels.where(labelled_mask, 0)  # unlabelled rows: any valid class, masked out
    per_row = F.cross_entropy(logits / temperature, safe_labels, reduction="none")
    loss = masked_mean(per_row, labelled_mask)
    return loss, {"cls": loss.detach()}


def self_distillation(
    logits: torch.Tensor, teacher_temp: float, student_temp: float = 0.1
) -> Losses:
    """self_distill = ½ [H(p¹, q²) + H(p², q¹)], H(p, q) = mean over B rows of −Σ_k p log q.

    logits s [2B, K]; teacher p = softmax(s.detach() / teacher_temp), student
    log q = log_softmax(s / student_temp); p¹, q¹ are view 1's rows, p², q² view 2's.
    """
    teacher1, teacher2 = F.softmax(logits.detach() / teacher_temp, dim=1).chunk(2)
    student1, student2 = F.log_softmax(logits / student_temp, dim=1).chunk(2)
    terms = [-(teacher1 * student2).sum(dim=1).mean(), -(teacher2 * student1).sum(dim=1).mean()]
    loss = torch.stack(terms).mean()
    return loss, {"self_distill": loss.detach()}


def mean_entropy_regulariser(logits: torch.Tensor, temperature: float = 0.1) -> Losses:
    """memax = log K − H(p̄), p̄ = mean over rows of softmax(s / temperature); s [N, K].

    0 for a uniform p̄, log K for a one-hot one: adding it spreads predictions over clusters.
    """
    mean_probs = F.softmax(logits / temperature, dim=1).mean(dim=0)
    # 0·log 0 = 0: clamping the log keeps an underflowed probability from giving NaN gradients.
    tiny = torch.finfo(mean_probs.dtype).tiny
    entropy = -(mean_probs * torch.log(mean_probs.clamp_min(tiny))).sum()
    loss = math.log(logits.shape[1]) - entropy
    return loss, {"memax": loss.detach()}


def _multi_positive_nce(
    z: torch.Tensor, groups: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ_i = −mean_{p∈P(i)} log(exp(s_ip) / Σ_{a≠i} exp(s_ia)).

    z [N, d], s = norm(z)·norm(z)ᵀ / temperature; groups int [N], P(i) = rows j ≠ i of i's
    group. Returns ℓ [N] (0 where P(i) is empty) and the bool [N] mask of P(i) ≠ ∅.
    """
    z = F.normalize(z, dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1)[:, None]
    positives = (groups[:, None] == groups[None, :]) & ~self_mask
    n_positives = positives.sum(dim=1)
    summed = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -summed / n_positives.clamp(min=1), n_positives > 0


def info_nce(z: torch.Tensor, temperature: float = 1.0) -> Losses:
    """SimCLR InfoNCE on z [2B, d]: row i's positive is its other view, the negatives the other
    2B−2 rows (cosine / temperature); mean over the 2B rows."""
    sample_ids = torch.arange(z.shape[0] // 2, device=z.device).repeat(2)
    loss = _multi_positive_nce(z, sample_ids, temperature)[0].mean()
    return loss, {"info_nce": loss.detach()}


def supcon(
    z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07, base_temperature: float = 0.07
) -> Losses:
    """SupCon on the labelled rows z [M, d], labels [M]: (temperature / base_temperature)·ℓ_i of
    ``_multi_positive_nce`` (positives share the label), mean over anchors with a positive;
    0 when no anchor has one."""
    if z.shape[0] < 2:  # a lone row's denominator is empty: -inf, and a NaN gradient
        loss = graph_zero(z)
    else:
        per_anchor, has_positive = _multi_positive_nce(z, labels, temperature)
        scale = temperature / base_temperature
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
) -> Losses:
    """The module's total for one branch; logits [2B, K], z [2B, d]. Components (unweighted):
    cls, self_distill, memax, info_nce, supcon."""
    parts = {
        "cls": supervised_ce(logits, labels, labelled_mask)[0],
        "self_distill": self_distillation(logits, teacher_temp)[0],
        "memax": mean_entropy_regulariser(logits)[0],
        "info_nce": info_nce(z)[0],
        "supcon": supcon(z[labelled_mask], labels[labelled_mask])[0],
    }
    unsup_weight = 1.0 - sup_weight
    total = (
        unsup_weight * (parts["self_distill"] + memax_weight * parts["memax"])
        + sup_weight * parts["cls"]
        + unsup_weight * parts["info_nce"]
        + sup_weight * parts["supcon"]
    )
    return total, {name: value.detach() for name, value in parts.items()}
