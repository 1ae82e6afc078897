"""Evaluating a stage-2 model: Hungarian-matched All / Old / New accuracy of the visual, text and
fused predictions on each split (``Evaluator``), or, where the classes of the unlabelled images
are unknown, what their clusters show (evaluation/clusters.py).

    evaluator = Evaluator(task, torch.device("cpu"), DistInfo())
    metrics = evaluator(model, {"train_unlabelled": loader})   # {'train_unlabelled/visual/all': ..., ...}
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from data.task import Task
from evaluation.accuracy import log_accs_from_preds
from evaluation.cache import EvalCache
from evaluation.clusters import agreement_metrics, describe_clusters
from evaluation.predict import predict_split
from util.dist import DistInfo
from vocabulary import GROUPS, HEADS


def accuracies(preds: dict[str, Tensor], num_old: int, eval_func: str = "v2") -> dict[str, float]:
    """{'<head>/<all|old|new>': accuracy, 'n_samples': N} of the predictions of ``predict_split``,
    for each head they hold."""
    y_true = preds["target"].numpy()
    metrics = {"n_samples": len(y_true)}
    for head in (h for h in HEADS if h in preds):
        accs = log_accs_from_preds(y_true, preds[head].numpy(), y_true < num_old, eval_func=eval_func)
        metrics.update({f"{head}/{group}": float(acc) for group, acc in zip(GROUPS, accs)})
    return metrics


class Evaluator:
    """Evaluates a stage-2 model on any of its splits, the same way every time.

    Args:
        task: the run's task (its old classes, and whether the unlabelled images' classes are known).
        device, info: where the model runs; the processes that share the splits.
        eval_func: 'v2' (sample-averaged) or 'v2b' (class-balanced) accuracy.
        progress: a progress bar per split.
        stop: asked before each batch on every process; the evaluation is abandoned (None) when
            it says to stop.
        sizes_file: without ground truth, where the clusters' sizes are written (main process).
        caches: {split: EvalCache} of the splits evaluated more than once.
    """

    def __init__(self, task: Task, device: torch.device, info: DistInfo, eval_func: str = "v2",
                 progress: bool = False, stop: Callable[[], bool] | None = None,
                 sizes_file: Path | None = None, caches: dict[str, EvalCache] | None = None):
        self.task, self.device, self.info, self.eval_func = task, device, info, eval_func
        self.progress, self.stop, self.sizes_file = progress, stop, sizes_file
        self.caches = caches or {}
        # The last evaluation's predictions ({split: predict_split's}), kept for the confusion
        # matrices at the end of a run: no second pass over the data.
        self.predictions: dict[str, dict[str, Tensor]] = {}

    def predict(self, model, split: str, loader: DataLoader) -> dict[str, Tensor] | None:
        """``predict_split`` of one split, through its cache if it has one."""
        return predict_split(model, loader, self.device, self.info, self.caches.get(split), self.progress, self.stop)

    def __call__(self, model, loaders: dict[str, DataLoader]) -> dict[str, float] | None:
        """Each split that has images (a folder dataset may have no test split) predicted, then
        {'<split>/<head>/<all|old|new>': accuracy, ...} where the classes of the unlabelled images
        are known, ``describe_clusters`` where they are not, and in both cases how alike the two
        heads cluster each split (``agreement_metrics``); None when a stop was requested."""
        preds = {}
        for split, loader in loaders.items():
            if len(loader.dataset):
                preds[split] = self.predict(model, split, loader)
                if preds[split] is None:
                    return None
        self.predictions = preds
        if not self.task.ground_truth:
            return describe_clusters(preds, self.task, self.sizes_file if self.info.is_main else None)
        metrics = {f"{split}/{key}": value for split, split_preds in preds.items()
                   for key, value in accuracies(split_preds, self.task.num_labeled_classes, self.eval_func).items()}
        return {**metrics, **agreement_metrics(preds)}

