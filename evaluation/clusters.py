"""What a run without ground truth can report (folder dataset, labelled/unlabelled layout):
the clusters of the unlabelled images, never an accuracy on them."""
from __future__ import annotations

import torch
from torch import Tensor

from pathlib import Path

from data.task import Task
from evaluation.accuracy import branch_agreement
from util.io import save_json
from util.logging_utils import get_logger
from vocabulary import HEADS


def describe_clusters(preds: dict[str, dict[str, Tensor]], task: Task, sizes_file: Path | None) -> dict[str, float]:
    """What can be known when the classes of the unlabelled images are not (folder dataset,
    labelled/unlabelled layout), from the predictions of each split (``predict_split``),
    for each head: the share of the unlabelled images in the old classes' clusters
    (0..K_old-1, which the supervised loss ties to the old classes), how many of the K clusters
    they use, and, when ``preds`` has 'test' (there: the labelled images, test transform), the
    accuracy on the labelled images (cluster = class, no matching); and how alike the two heads
    cluster each split (``agreement_metrics``). The size of every cluster goes to
    ``sizes_file`` when given."""
    unlabelled, num_old, num_classes = preds["train_unlabelled"], task.num_labeled_classes, task.num_classes
    metrics: dict[str, float] = {"train_unlabelled/n_samples": len(unlabelled["index"])}
    heads = [head for head in HEADS if head in unlabelled]
    sizes = {head: torch.bincount(unlabelled[head], minlength=num_classes) for head in heads}
    for head, size in sizes.items():
        metrics[f"train_unlabelled/{head}/old_share"] = float(size[:num_old].sum() / max(size.sum(), 1))
        metrics[f"train_unlabelled/{head}/clusters_used"] = int(torch.count_nonzero(size))
    if "test" in preds:
        labelled = preds["test"]
        metrics["train_labelled/n_samples"] = len(labelled["index"])
        for head in heads:
            metrics[f"train_labelled/{head}/acc"] = float((labelled[head] == labelled["target"]).double().mean())
    metrics.update(agreement_metrics(preds))
    if sizes_file is not None:
        save_json({head: size.tolist() for head, size in sizes.items()}, sizes_file)
    get_logger().info("clusters of the unlabelled images (no ground truth: no accuracy; best.pt is the "
                      "last epoch):%s\n    sizes (%s): %s", format_clusters(metrics, num_classes), heads[-1],
                      " ".join(map(str, sizes[heads[-1]].tolist())))
    return metrics


def agreement_metrics(preds: dict[str, dict[str, Tensor]]) -> dict[str, float]:
    """{'<split>/agreement/<same|matched>': share} of each split's predictions
    (``predict_split``): how alike the visual and text heads cluster it, without labels
    (``branch_agreement``); {} for a single-branch model."""
    metrics = {}
    for split, split_preds in preds.items():
        if "visual" not in split_preds or "text" not in split_preds:
            continue
        same, matched = branch_agreement(split_preds["visual"].numpy(), split_preds["text"].numpy())
        metrics.update({f"{split}/agreement/same": same, f"{split}/agreement/matched": matched})
    return metrics


def format_clusters(metrics: dict, num_classes: int) -> str:
    """One row per head of what ``describe_clusters`` measured, then the heads' agreement."""
    n = metrics["train_unlabelled/n_samples"]
    agreement = "" if "train_unlabelled/agreement/same" not in metrics else (
        f"\n    visual and text heads: the same cluster for {metrics['train_unlabelled/agreement/same']:.1%} "
        f"of the unlabelled images, {metrics['train_unlabelled/agreement/matched']:.1%} after matching "
        "their cluster ids")
    return "".join(
        f"\n    {head:<6} {metrics[f'train_unlabelled/{head}/old_share']:.1%} of {n} unlabelled images in "
        f"old-class clusters, {metrics[f'train_unlabelled/{head}/clusters_used']}/{num_classes} clusters used"
        + (f", labelled accuracy {metrics[f'train_labelled/{head}/acc']:.4f}"
           if f"train_labelled/{head}/acc" in metrics else "")
        for head in HEADS if f"train_unlabelled/{head}/old_share" in metrics) + agreement
