"""Stage-2 GET loss: two SimGCD branches plus cross-modal instance consistency (GET_SPEC.md §4).

    total = L_visual + L_text + cico_weight · L_cico

``out`` is the dict returned by the GET model's forward on the 2B rows of both views (view 1
then view 2): 'v_feat' [2B, 768] visual CLS features, 't_feat' [2B, 768] mapped text features,
'v_proj' / 't_proj' [2B, 256] head projections, 'v_logits' / 't_logits' [2B, K] class logits.
The training loop calls ``get_loss(out, labels, labelled_mask, teacher_temperature(epoch),
memax_weight=...)`` and logs every returned component.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods import check_labelled_rows, full_precision, graph_zero
from methods.simgcd import Losses, branch_loss

MODEL_OUTPUT_KEYS = ("v_feat", "t_feat", "v_proj", "v_logits", "t_proj", "t_logits")


def _class_anchors(features: torch.Tensor, slots: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean of the raw feature rows of each class, detached.

    features: float [M, D] labelled rows; slots: int64 [M] in [0, n_classes), every slot used.
    Returns float [n_classes, D]; a one-hot matmul sums the rows of each class in one pass.
    """
    one_hot = F.one_hot(slots, n_classes).to(features.dtype)
    sums = one_hot.T @ features.detach()
    return sums / one_hot.sum(dim=0)[:, None]


def _anchor_log_probs(
    features: torch.Tensor, anchors: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log softmax over classes of cos(features, anchors) / temperature: float [N, C]."""
    cosine = F.normalize(features, dim=1) @ F.normalize(anchors, dim=1).T
    return F.log_softmax(cosine / temperature, dim=1)


@full_precision
def cico_loss(
    v_feat: torch.Tensor,
    t_feat: torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    temperature: float = 0.4,
) -> Losses:
    """Cross-modal instance consistency.

    v_feat: float [2B, Dv] raw visual features; t_feat: float [2B, Dt] raw mapped text features;
    labels: int64 [2B]; labelled_mask: bool [2B]. For each class present among the labelled
    rows, anchor_v = mean of its labelled rows of v_feat (both views, raw, detached) and
    anchor_t likewise from t_feat. For every row, q_v = softmax(cos(v, anchors_v) / temperature)
    and q_t = softmax(cos(t, anchors_t) / temperature) over the classes present; then
    L = CE(q_t.detach() -> q_v) + CE(q_v.detach() -> q_t), each CE the mean over all 2B rows of
    -Σ_k target_k log prediction_k. No labelled row gives a graph-attached 0.
    Components: ``cico``.
    """
    check_labelled_rows(v_feat.shape[0], labels, labelled_mask)
    if t_feat.shape[0] != v_feat.shape[0]:
        raise ValueError(
            f"v_feat and t_feat must have the same rows (both views stacked), got "
            f"{v_feat.shape[0]} and {t_feat.shape[0]}"
        )
    if not labelled_mask.any():
        loss = graph_zero(v_feat) + graph_zero(t_feat)
        return loss, {"cico": loss.detach()}
    classes, slots = torch.unique(labels[labelled_mask], return_inverse=True)
    anchors_v = _class_anchors(v_feat[labelled_mask], slots, classes.numel())
    anchors_t = _class_anchors(t_feat[labelled_mask], slots, classes.numel())
    log_q_v = _anchor_log_probs(v_feat, anchors_v, temperature)
    log_q_t = _anchor_log_probs(t_feat, anchors_t, temperature)
    visual_term = -(log_q_t.exp().detach() * log_q_v).sum(dim=1).mean()
    text_term = -(log_q_v.exp().detach() * log_q_t).sum(dim=1).mean()
    loss = visual_term + text_term
    return loss, {"cico": loss.detach()}


def get_loss(
    out: dict[str, torch.Tensor],
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    teacher_temp: float,
    sup_weight: float = 0.35,
    memax_weight: float = 1.0,
    cico_weight: float = 1.0,
) -> Losses:
    """Total stage-2 loss: branch_loss(visual) + branch_loss(text) + cico_weight · cico.

    out: the model's forward dict (keys ``MODEL_OUTPUT_KEYS``, all with 2B rows); labels: int64
    [2B]; labelled_mask: bool [2B]; teacher_temp: ``teacher_temperature(epoch)``. The SupCon
    terms use only the labelled rows of v_proj / t_proj. Components: ``visual/<term>`` and
    ``text/<term>`` for cls, self_distill, memax, info_nce, supcon, plus ``visual/total``,
    ``text/total`` and ``cico`` (unweighted).
    """
    missing = [key for key in MODEL_OUTPUT_KEYS if key not in out]
    if missing:
        raise KeyError(
            f"get_loss needs the GET model's forward dict with keys {MODEL_OUTPUT_KEYS}; "
            f"missing {missing}"
        )
    components: dict[str, torch.Tensor] = {}
    branch_totals = []
    for branch, prefix in (("visual", "v"), ("text", "t")):
        branch_total, parts = branch_loss(
            out[f"{prefix}_logits"],
            out[f"{prefix}_proj"],
            labels,
            labelled_mask,
            teacher_temp,
            sup_weight=sup_weight,
            memax_weight=memax_weight,
        )
        branch_totals.append(branch_total)
        components.update({f"{branch}/{name}": value for name, value in parts.items()})
        components[f"{branch}/total"] = branch_total.detach()
    cico, _ = cico_loss(out["v_feat"], out["t_feat"], labels, labelled_mask)
    components["cico"] = cico.detach()
    visual_total, text_total = branch_totals
    return visual_total + text_total + cico_weight * cico, components
