"""Estimate K, the number of classes, where nobody gives it: ``--num_classes auto`` of train.py
(and the folder dataset's labelled/unlabelled layout without ``--num_classes``) and the
standalone ``python estimate_k.py``. The method of Vaze et al. (GCD, CVPR 2022):

1. the frozen CLIP image embedding (after the visual projection, L2-normalised) of every
   training image, labelled and unlabelled, under the test transform;
2. for a given k, k-means of all of them into k clusters (evaluation/kmeans.py: torch, on the
   run's device, scikit-learn's algorithm), scored by the Hungarian accuracy of the clusters on
   the labelled images alone, the only ones whose class is known;
3. Brent's method (scipy's bounded ``minimize_scalar`` on minus the score, k rounded to a
   whole number) searches k between K_old and ``--max_classes``, then steps to a better
   neighbouring k while there is one; no k is clustered twice.

The score sees the old classes only: it drops when k-means splits an old class (k too
large) or merges two of them (k too small), and nothing that happens among the new classes
changes it. So the estimate is right where getting K wrong hurts the old classes first.

train.py estimates K at the start of a run, before stage 1 (it needs only the frozen CLIP,
and every checkpoint then carries K): ``k_estimate.json`` in the run folder holds the
estimate and the accuracy at each k evaluated, TensorBoard has them as ``k_estimate/*``
(step = k) and config.json gets ``estimated_num_classes``. A run that continues a checkpoint
takes its K instead of estimating it again.
"""
from __future__ import annotations

import math
import time
from argparse import Namespace
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch.utils.data import DataLoader, Dataset

from backbone import clip_autocast
from config import vision_image_size
from data.augmentations import get_transforms
from data.data_utils import check_readable, skip_bad_images
from data.get_datasets import get_datasets
from data.samplers import ShardSampler
from data.task import Task
from errors import InputError
from evaluation.accuracy import split_cluster_acc_v2
from evaluation.kmeans import kmeans
from evaluation.predict import gather_outputs
from util.dist import DistInfo, broadcast_object
from util.logging_utils import get_logger
from util.rng import derive_seed

K_ESTIMATE = "k_estimate.json"
# k-means restarts per k (k-means++ seeding, the best inertia kept): a few guard against a bad
# local optimum; each costs a full k-means, the price of the whole search (bench/estimate_k.py).
KMEANS_INITS = 3


@dataclass
class KEstimate:
    k: int                      # the estimate of K
    curve: dict[int, float]     # labelled-image accuracy of each k, in the order evaluated
    k_min: int                  # the search interval: K_old ...
    k_max: int                  # ... and --max_classes (at most the number of images)
    n_images: int
    n_labelled: int
    seconds: float

    def record(self) -> dict:
        """As JSON: the curve sorted by k, and the order in which Brent's search evaluated k."""
        return {**asdict(self), "curve": [{"k": k, "labelled_acc": self.curve[k]} for k in sorted(self.curve)],
                "order": list(self.curve)}


def labelled_accuracy(features: torch.Tensor | np.ndarray, labels: np.ndarray, labelled: np.ndarray, k: int,
                      seed: int = 0) -> float:
    """Hungarian accuracy on the labelled rows of a k-means of ALL rows into k clusters, on
    the features' device, its initial centres drawn from a stream of its own for each (seed, k).

    features: float [N, D] (a tensor on any device, or an array: the CPU); labels: int [N]
    (any value where not labelled); labelled: bool [N].
    """
    result = kmeans(torch.as_tensor(features), k, n_init=KMEANS_INITS, seed=derive_seed(seed, "k-means", k))
    clusters = result.labels.cpu().numpy()
    return split_cluster_acc_v2(labels[labelled], clusters[labelled], np.ones(int(labelled.sum()), bool))[0]


def brent_search(score: Callable[[int], float], k_min: int, k_max: int) -> tuple[int, dict[int, float]]:
    """The whole k in [k_min, k_max] that maximises ``score`` by Brent's bounded method, and
    the score of every k evaluated, in the order evaluated (each k once)."""
    curve: dict[int, float] = {}

    def score_of(k: int) -> float:
        if k not in curve:
            curve[k] = score(k)
        return curve[k]

    def whole(x: float) -> int:
        return min(max(math.floor(x + 0.5), k_min), k_max)

    # Each whole k owns [k - 1/2, k + 1/2), so the interval's ends get their fair share; Brent
    # stops once its bracket is about one k wide.
    result = minimize_scalar(lambda x: -score_of(whole(x)), bounds=(k_min - 0.49, k_max + 0.49),
                             method="bounded", options={"xatol": 0.5})
    best = whole(result.x)
    # Brent works on a continuum and may stop a step short on whole numbers: step to a better
    # neighbour while there is one.
    while True:
        neighbour = max((k for k in (best - 1, best + 1) if k_min <= k <= k_max), key=score_of, default=best)
        if score_of(neighbour) <= score_of(best):
            return best, curve
        best = neighbour


@torch.no_grad()
def clip_features(clip: torch.nn.Module, dataset: Dataset, args: Namespace, device: torch.device,
                  info: DistInfo) -> dict[str, torch.Tensor]:
    """The CLIP image embedding (after the projection, L2-normalised) of every item of
    ``dataset`` (a MergedDataset: image, target, uq_idx, is_labelled), each process computing
    its shard: {'feature' [N, D] float32, 'target' [N], 'labelled' [N] bool, 'index' [N]} in
    sample order, on the CPU."""
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        sampler=ShardSampler(len(dataset), info.rank, info.world_size),
                        generator=torch.Generator())  # the global RNG stays untouched

    def features(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labelled = batch
        with clip_autocast(device.type, args.amp):
            embedding = clip.encode_image(images.to(device, non_blocking=True))
        return {"feature": F.normalize(embedding.float(), dim=-1), "labelled": labelled}

    batches = (((images, labelled), targets, uq_idx) for images, targets, uq_idx, labelled in loader)
    return gather_outputs(batches, features, info, total=len(loader), progress=args.progress and info.is_main,
                          desc="CLIP features")


def search_bounds(task: Task, max_classes: int | None, n_images: int) -> tuple[int, int]:
    """[K_old, --max_classes (default 4 K_old, at least 20)], at most one cluster per image."""
    k_min = task.num_labeled_classes
    k_max = min(max_classes or max(4 * k_min, 20), n_images)
    if n_images <= k_min:
        raise InputError(f"the {n_images} training images leave no K to search above the {k_min} old "
                         "classes (at most one cluster per image): K cannot be estimated; add images or "
                         "give --num_classes.")
    if k_max <= k_min:
        raise InputError(f"--max_classes {max_classes} leaves no K to search above the {k_min} old "
                         f"classes ({n_images} training images); give a larger --max_classes.")
    return k_min, k_max


def estimate_k(clip: torch.nn.Module, task: Task, args: Namespace, device: torch.device, info: DistInfo,
               skip_log: Path | None = None) -> KEstimate:
    """Estimate K for ``task`` with the frozen ``clip`` (the flags give --max_classes, the
    batches, the seed). ``skip_log``: replace unreadable images, recording them there."""
    start = time.time()
    _, test_transform = get_transforms(image_size=vision_image_size(args.clip_model),
                                       normalization=args.normalization)
    train_set = get_datasets(task.dataset_name, test_transform, test_transform, task)[0]
    if skip_log is None:  # images whose header failed (the folder dataset checks them all): stop now
        check_readable([train_set.unlabelled_dataset.raw], skipping=False)
    else:
        skip_bad_images([train_set], skip_log)
    k_min, k_max = search_bounds(task, args.max_classes, len(train_set))  # a bad --max_classes fails before the encoding
    data = clip_features(clip, train_set, args, device, info)
    labels, labelled = (data[key].numpy() for key in ("target", "labelled"))
    features = data["feature"].to(device)  # k-means runs where the CLIP ran: the GPU of a GPU run
    get_logger().info("estimating K: k-means of the CLIP features of %d images, scored on the %d "
                      "labelled ones, Brent's search of k in [%d, %d]", len(features), labelled.sum(),
                      k_min, k_max)
    k, curve = brent_search(partial(labelled_accuracy, features, labels, labelled, seed=args.seed),
                            k_min, k_max)
    # Every process ran the same search; rank 0's answer is the run's, whatever the floats did.
    k = broadcast_object(k, info)
    return KEstimate(k, curve, k_min, k_max, len(features), int(labelled.sum()),
                     round(time.time() - start, 2))


def format_estimate(estimate: KEstimate, num_old: int) -> str:
    """The estimate and the accuracy-vs-k curve, for the log."""
    rows = "".join(f"\n    k {k:>5d}  labelled accuracy {estimate.curve[k]:.4f}" + ("  <- K" if k == estimate.k else "")
                   for k in sorted(estimate.curve))
    return (f"estimated K = {estimate.k} ({num_old} old + {estimate.k - num_old} new classes): "
            f"{len(estimate.curve)} values of k evaluated in [{estimate.k_min}, {estimate.k_max}] "
            f"(a full sweep: {estimate.k_max - estimate.k_min + 1}), {estimate.seconds:.1f} s{rows}")
