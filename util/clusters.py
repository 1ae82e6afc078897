"""What a run without ground truth can report (folder dataset, labelled/unlabelled layout):
the clusters of the unlabelled images, never an accuracy on them."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from params import HEADS
from util.logging_utils import get_logger, save_json
from util.runs import Run

if TYPE_CHECKING:
    from util.eval_cache import EvalCache

CLUSTER_SIZES = "cluster_sizes.json"


@torch.no_grad()
def describe_clusters(model: torch.nn.Module, loaders: dict[str, DataLoader], num_old: int, run: Run,
                      caches: dict[str, EvalCache] | None = None) -> dict[str, float] | None:
    """What can be known when the classes of the unlabelled images are not (folder dataset,
    labelled/unlabelled layout), for each head: the share of the unlabelled images in the old
    classes' clusters (0..K_old-1, which the supervised loss ties to the old classes), how
    many of the K clusters they use, and, when ``loaders`` has 'test' (there: the labelled
    images, test transform), the accuracy on the labelled images (cluster = class, no
    matching). The size of every cluster goes to cluster_sizes.json. None when a stop was
    requested meanwhile."""
    from engine import predict_split  # engine.evaluate_run calls this function

    caches = caches or {}
    unlabelled = predict_split(model, loaders["train_unlabelled"], run, caches.get("train_unlabelled"))
    if unlabelled is None:
        return None
    num_classes = run.args.num_labeled_classes + run.args.num_unlabeled_classes
    metrics: dict[str, float] = {"train_unlabelled/n_samples": len(unlabelled["index"])}
    sizes = {head: torch.bincount(unlabelled[head], minlength=num_classes) for head in HEADS}
    for head, size in sizes.items():
        metrics[f"train_unlabelled/{head}/old_share"] = float(size[:num_old].sum() / max(size.sum(), 1))
        metrics[f"train_unlabelled/{head}/clusters_used"] = int(torch.count_nonzero(size))
    if "test" in loaders:
        labelled = predict_split(model, loaders["test"], run, caches.get("test"))
        if labelled is None:
            return None
        metrics["train_labelled/n_samples"] = len(labelled["index"])
        for head in HEADS:
            metrics[f"train_labelled/{head}/acc"] = float((labelled[head] == labelled["target"]).double().mean())
    if run.info.is_main:
        save_json({head: size.tolist() for head, size in sizes.items()}, run.dir / CLUSTER_SIZES)
    get_logger().info("clusters of the unlabelled images (no ground truth: no accuracy; best.pt is the "
                      "last epoch):%s\n    sizes (fused): %s", format_clusters(metrics, num_classes),
                      " ".join(map(str, sizes["fused"].tolist())))
    return metrics


def format_clusters(metrics: dict, num_classes: int) -> str:
    """One row per head of what ``describe_clusters`` measured."""
    n = metrics["train_unlabelled/n_samples"]
    return "".join(
        f"\n    {head:<6} {metrics[f'train_unlabelled/{head}/old_share']:.1%} of {n} unlabelled images in "
        f"old-class clusters, {metrics[f'train_unlabelled/{head}/clusters_used']}/{num_classes} clusters used"
        + (f", labelled accuracy {metrics[f'train_labelled/{head}/acc']:.4f}"
           if f"train_labelled/{head}/acc" in metrics else "") for head in HEADS)
