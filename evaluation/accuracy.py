"""Clustering accuracy for GCD with Hungarian matching (docs/method.md, "Evaluation").

One assignment of cluster ids to classes is computed on ALL samples
(``scipy.optimize.linear_sum_assignment`` maximising the matched counts);
All / Old / New accuracies are then read under that single assignment.
``mask`` marks samples whose TRUE class is old (remapped target <
``num_labeled_classes``). An empty group (e.g. no new-class
sample) has accuracy 0.0 by convention, never NaN.

Example::

    all_acc, old_acc, new_acc = log_accs_from_preds(targets, preds, targets < args.num_labeled_classes)
"""
from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)


def _as_inputs(y_true: np.ndarray, y_pred: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert to int64 [N], int64 [N], bool [N]."""
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    y_pred = np.asarray(y_pred).astype(np.int64).reshape(-1)
    mask = np.asarray(mask).astype(bool).reshape(-1)
    if not y_true.size == y_pred.size == mask.size:
        raise ValueError(
            f"y_true, y_pred and mask must have the same length, got {y_true.size}, {y_pred.size}, {mask.size}."
        )
    if y_true.size == 0:
        raise ValueError("Cannot compute a clustering accuracy on zero samples.")
    if y_true.min() < 0 or y_pred.min() < 0:
        raise ValueError("Class and cluster ids must be non-negative integers.")
    return y_true, y_pred, mask


def cluster_to_class(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Int [D]: the class that the optimal one-to-one matching assigns to each cluster id.

    The count matrix w[pred, true] (size D x D, D = max id + 1, so more or
    fewer clusters than classes both work) is built with one bincount.
    """
    size = int(max(y_pred.max(), y_true.max())) + 1
    counts = np.bincount(y_pred * size + y_true, minlength=size * size).reshape(size, size)
    rows, cols = linear_sum_assignment(counts.max() - counts)
    matched = np.empty(size, dtype=np.int64)
    matched[rows] = cols
    return matched


def _matched(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Bool [N]: sample i's cluster is assigned to its true class by the optimal matching."""
    return cluster_to_class(y_true, y_pred)[y_pred] == y_true


def _fraction(hits: np.ndarray) -> float:
    """Mean of a bool/float array; 0.0 for an empty one."""
    return float(hits.mean()) if hits.size else 0.0


def split_cluster_acc_v2(y_true: np.ndarray, y_pred: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(All, Old, New) accuracy: matched samples / samples, in each group.

    y_true: int [N] true classes; y_pred: int [N] cluster ids; mask: bool [N],
    True where the sample's true class is old.
    """
    y_true, y_pred, mask = _as_inputs(y_true, y_pred, mask)
    hits = _matched(y_true, y_pred)
    return _fraction(hits), _fraction(hits[mask]), _fraction(hits[~mask])


def split_cluster_acc_v2_balanced(
    y_true: np.ndarray, y_pred: np.ndarray, mask: np.ndarray
) -> tuple[float, float, float]:
    """(All, Old, New) as means of per-class accuracies, under the same single assignment.

    Old averages over the classes of ``y_true[mask]``, New over those of
    ``y_true[~mask]``, All over every class present in ``y_true``.
    """
    y_true, y_pred, mask = _as_inputs(y_true, y_pred, mask)
    hits = _matched(y_true, y_pred)
    samples_per_class = np.bincount(y_true)
    per_class = np.bincount(y_true, weights=hits.astype(np.float64)) / np.maximum(samples_per_class, 1)

    def mean_over(classes: np.ndarray) -> float:
        """Mean accuracy of the distinct classes in ``classes``."""
        return _fraction(per_class[np.unique(classes)])

    return mean_over(y_true), mean_over(y_true[mask]), mean_over(y_true[~mask])


EVAL_FUNCS = {"v2": split_cluster_acc_v2, "v2b": split_cluster_acc_v2_balanced}


def branch_agreement(visual: np.ndarray, text: np.ndarray) -> tuple[float, float]:
    """How alike two heads cluster the same images, without any label: (the share of images
    both put in the same cluster, that share after the best one-to-one matching of the text
    head's cluster ids to the visual head's).

    The fused prediction averages the heads cluster id by cluster id, so it can only gain
    where their ids agree. Supervision ties the old classes to clusters 0..K_old-1 in both
    heads; nothing in GET ties the new classes' clusters across the branches, so a matched
    share far above the plain one means the heads found the same groups under different ids.
    """
    visual, text, _ = _as_inputs(visual, text, np.ones(np.size(visual), dtype=bool))
    return _fraction(visual == text), _fraction(_matched(visual, text))


def log_accs_from_preds(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    mask: np.ndarray,
    eval_func: str = "v2",
    name: str | None = None,
) -> tuple[float, float, float]:
    """(All, Old, New) with ``eval_func`` ('v2' or 'v2b'); logged at INFO when ``name`` is given."""
    if eval_func not in EVAL_FUNCS:
        raise ValueError(f"Unknown eval_func {eval_func!r}; expected one of {sorted(EVAL_FUNCS)}.")
    all_acc, old_acc, new_acc = EVAL_FUNCS[eval_func](y_true, y_pred, mask)
    if name is not None:
        logger.info("%s (%s): All %.4f | Old %.4f | New %.4f", name, eval_func, all_acc, old_acc, new_acc)
    return all_acc, old_acc, new_acc
