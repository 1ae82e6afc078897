"""Stage 2: the GET loss, two SimGCD branches plus cross-modal consistency, and the training
step that computes it (docs/method.md, "Stage 2").

    total = L_visual + L_text + cico_weight·L_cico

A model of one branch (--branches visual: SimGCD on CLIP; --branches text) trains on that
branch's L alone, without CICO.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods import Losses, graph_zero
from methods.simgcd import branch_loss
from util.dist import DistInfo, gather_views


def cico_loss(
    v_feat: torch.Tensor,
    t_feat: torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    temperature: float = 0.4,
) -> Losses:
    """cico = H(q_t.detach(), q_v) + H(q_v.detach(), q_t), H(p, q) = mean_i −Σ_k p_ik log q_ik.

    v_feat [2B, Dv] visual features, t_feat [2B, Dt] mapped text features (raw). Over the C
    classes among the labelled rows: anchor_c = mean of the class's labelled rows (detached),
    q = softmax(cos(feat, anchors) / temperature) [2B, C]. 0 without labelled rows.
    """
    if not labelled_mask.any():
        loss = graph_zero(v_feat) + graph_zero(t_feat)
        return loss, {"cico": loss.detach()}
    classes, slots = torch.unique(labels[labelled_mask], return_inverse=True)

    def log_q(feat: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(slots, classes.numel()).to(feat.dtype)  # [M, C]
        anchors = one_hot.T @ feat[labelled_mask].detach() / one_hot.sum(dim=0)[:, None]
        cosine = F.normalize(feat, dim=1) @ F.normalize(anchors, dim=1).T
        return F.log_softmax(cosine / temperature, dim=1)

    log_q_v, log_q_t = log_q(v_feat), log_q(t_feat)
    visual_term = -(log_q_t.exp().detach() * log_q_v).sum(dim=1).mean()
    text_term = -(log_q_v.exp().detach() * log_q_t).sum(dim=1).mean()
    loss = visual_term + text_term
    return loss, {"cico": loss.detach()}


def dual_branch_loss(
    out: dict[str, torch.Tensor],
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    teacher_temp: float,
    sup_weight: float = 0.35,
    memax_weight: float = 1.0,
    cico_weight: float = 1.0,
) -> Losses:
    """The module's total on the model's forward dict: 'v_logits' / 't_logits' [2B, K],
    'v_proj' / 't_proj' [2B, d], 'v_feat' / 't_feat' [2B, D]; teacher_temp = τ_t(epoch).
    A dict of one branch's outputs (a single-branch model) gives that branch's total alone.

    Components: visual/<term> and text/<term> of ``branch_loss``, visual/total, text/total,
    cico (unweighted); those of the branches in ``out``.
    """
    total = 0.0
    components: dict[str, torch.Tensor] = {}
    present = [(branch, key) for branch, key in (("visual", "v"), ("text", "t")) if f"{key}_logits" in out]
    for branch, key in present:
        branch_total, parts = branch_loss(out[f"{key}_logits"], out[f"{key}_proj"], labels,
                                          labelled_mask, teacher_temp, sup_weight, memax_weight)
        total = total + branch_total
        components.update({f"{branch}/{name}": value for name, value in parts.items()})
        components[f"{branch}/total"] = branch_total.detach()
    if len(present) < 2:
        return total, components
    cico, cico_parts = cico_loss(out["v_feat"], out["t_feat"], labels, labelled_mask)
    components.update(cico_parts)
    return total + cico_weight * cico, components


# The flags that weigh dual_branch_loss's terms: its keyword arguments of the same names.
LOSS_WEIGHTS = (
    "sup_weight",
    "memax_weight",
    "cico_weight",
)


@dataclass
class GETStep:
    """Stage 2's step: the loss of one batch.

    The model runs on the images of both views; the rows of every process are gathered into
    the global batch, and ``dual_branch_loss`` is taken over it with the teacher temperature of the
    epoch, so N processes compute the loss of one.
    """
    net: nn.Module                           # model.GETModel, or its DDP / compiled wrapper
    info: DistInfo
    teacher_temp: Callable[[int], float]     # τ_t(epoch): methods.simgcd.teacher_temperature
    weights: dict[str, float] = field(default_factory=dict)  # dual_branch_loss's weights (default: its defaults)

    @classmethod
    def from_flags(cls, net: nn.Module, info: DistInfo, teacher_temp: Callable[[int], float], args) -> GETStep:
        """The step with the loss weights of the flags (``LOSS_WEIGHTS``)."""
        return cls(net, info, teacher_temp, {name: getattr(args, name) for name in LOSS_WEIGHTS})

    def __call__(self, images: Tensor, labels: Tensor, labelled: Tensor, epoch: int, step: int) -> Losses:
        b = gather_views({**self.net(images), "labels": labels, "labelled": labelled}, self.info)
        return dual_branch_loss(b, b["labels"], b["labelled"], self.teacher_temp(epoch), **self.weights)
