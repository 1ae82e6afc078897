"""The training engine: the epoch loop of a stage, one epoch, evaluation and checkpoints.

``train.py`` builds each stage as a ``Stage`` (its model, loss, optimiser and checkpoint) and
hands it to ``fit``: for each epoch, ``train_one_epoch`` (resumable mid-epoch from a
``Position``), an evaluation (``evaluate``: Hungarian-matched All/Old/New accuracy of the
visual, text and fused predictions), the epoch's log line and ``save_checkpoints``.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from argparse import Namespace
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import format_parameter_summary
from params import HEADS
from util.checkpoint import LAST_CHECKPOINT, atomic_save
from util.rng import rng_state, set_rng_state
from util.cluster_and_log_utils import log_accs_from_preds
from util.dist import any_rank, barrier, gather_predictions
from util.clusters import agreement_metrics, describe_clusters
from util.eval_cache import EvalCache, frozen_batches
from util.logging_utils import get_logger
from util.reporting import log_epoch
from util.runs import Run

# (images [2B, 3, H, W], labels [2B], labelled [2B] bool, epoch, step in the epoch)
#   -> (loss, {term: value})
LossFn = Callable[[Tensor, Tensor, Tensor, int, int], tuple[Tensor, dict[str, Tensor]]]


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Position:
    """Where a stage is; saved in every checkpoint (as "loop")."""
    epoch: int = 0            # completed epochs
    step_in_epoch: int = 0    # steps of the current epoch already trained (interrupted runs)
    global_step: int = 0
    sums: dict = field(default_factory=dict)  # running sums of the loss terms this epoch
    best: float = -1.0        # best value of --best_metric so far (stage 2)

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.sums = self.epoch + 1, 0, {}


def checkpoint_meta(args: Namespace) -> dict:
    """What a checkpoint must agree on with this run to be usable."""
    return {"dataset": args.dataset_name, "num_old": args.num_labeled_classes,
            "num_classes": args.num_labeled_classes + args.num_unlabeled_classes,
            "clip_model": args.clip_model, "n_words": args.n_words}


def sgd_cosine(params, lr: float, epochs: int, args: Namespace):
    """SGD with the flags' momentum and weight decay, cosine-annealed to lr/1000 (both stages)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=lr * 1e-3)


@dataclass
class Stage:
    """One training stage: what trains, its loss, its optimiser, and what its checkpoint holds."""
    name: str                  # 'tes' (stage 1) or 'get' (stage 2): checkpoint and log prefix
    model: torch.nn.Module     # the unwrapped model: its trainable part is checkpointed
    loss_fn: LossFn            # runs the (possibly DDP-wrapped or compiled) model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epochs: int
    meta: dict                 # what a checkpoint must agree on with this run
    extra: dict = field(default_factory=dict)  # frozen state saved along (stage 2: the TES)
    schedule: Callable[[int], dict] = lambda epoch: {}  # per-epoch values logged (teacher temp.)

    @property
    def last_name(self) -> str:
        """File name of the stage's latest full state in the run folder."""
        return LAST_CHECKPOINT[self.name]

    def save(self, path: Path, position: Position, args: Namespace) -> None:
        atomic_save({"meta": self.meta, "stage": self.name, "loop": asdict(position),
                     "model": self.model.trainable_state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rng_state(), "args": json.loads(json.dumps(vars(args), default=str)),
                     **self.extra}, path)

    def restore(self, checkpoint: dict) -> Position:
        """Continue from a checkpoint of this stage (already read and validated by --resume)."""
        self.model.load_trainable_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        return Position(**checkpoint["loop"])


def fit(stage: Stage, loader: DataLoader, run: Run, checkpoint: dict | None,
        evaluate_epoch: Callable[[int], dict | None] | None = None) -> dict | None:
    """Train ``stage`` from ``checkpoint`` (or the start); after each epoch: evaluate (every
    --eval_every epochs and the last), log, checkpoint. Returns the last evaluation ({} when
    no epoch was left to train), None when stopped on request (the state saved to resume)."""
    log = get_logger()
    position = stage.restore(checkpoint) if checkpoint else Position()
    log.info("parameters:\n%s", format_parameter_summary(stage.model.parameter_summary()))
    metrics = {}
    while position.epoch < stage.epochs:
        start = time.time()
        due = (position.epoch + 1) % run.args.eval_every == 0 or position.epoch + 1 == stage.epochs
        finished = train_one_epoch(stage, loader, position, run)
        metrics = evaluate_epoch(position.epoch) if finished and evaluate_epoch and due else {}
        if not finished or metrics is None:  # a stop request, during training or evaluation
            if run.info.is_main:
                stage.save(run.dir / stage.last_name, position, run.args)
            log.warning("stopped on request; state saved to %s (resume with --resume auto)",
                        run.dir / stage.last_name)
            return None
        lr = stage.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # resumed at an epoch's end, no step ran here: the schedule is right
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            stage.scheduler.step()
        log_epoch(stage, position, {"lr": lr, "seconds": round(time.time() - start, 3), "eval": metrics}, run)
        position.next_epoch()
        save_checkpoints(stage, position, metrics, run)
    return metrics


def train_one_epoch(stage: Stage, loader: DataLoader, position: Position, run: Run) -> bool:
    """Train from ``position`` to the end of its epoch (True) or until a stop request (False).

    The epoch's draw and every sample's augmentation depend on (seed, stage, epoch, position)
    only, and the batches already trained in this epoch are skipped: a resumed epoch sees
    exactly the batches that an uninterrupted one would, whatever the processes and loader
    workers.
    """
    args, device = run.args, run.device
    loader.sampler.set_epoch(position.epoch, skip=position.step_in_epoch * loader.batch_size,
                             stage=stage.name)
    n_steps = len(loader) + position.step_in_epoch
    if args.max_steps_per_epoch:
        n_steps = min(n_steps, args.max_steps_per_epoch)
    stage.model.train()
    bar = tqdm(total=n_steps, initial=position.step_in_epoch, leave=False, dynamic_ncols=True,
               desc=f"{stage.name} epoch {position.epoch}", disable=not (args.progress and run.info.is_main))
    pending: list[Tensor] = []  # loss terms of the steps not yet brought to the host
    stopping = False
    for views, labels, _, labelled in loader:
        if position.step_in_epoch >= n_steps:
            break
        # Each view is a pinned tensor: copied while the previous step still runs.
        images = torch.cat([view.to(device, non_blocking=True) for view in views])  # view 1, view 2
        labels = labels.to(device, non_blocking=True).repeat(2)
        labelled = labelled.to(device, non_blocking=True).bool().repeat(2)
        loss, terms = stage.loss_fn(images, labels, labelled, position.epoch, position.step_in_epoch)
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stage.optimizer.step()
        names = ["total", *terms]
        pending.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())]))
        position.step_in_epoch += 1
        position.global_step += 1
        bar.update(1)
        if len(pending) == args.log_every or position.step_in_epoch >= n_steps:
            stopping = log_steps(stage, position, dict(zip(names, torch.stack(pending).T)), run)
            pending = []
            bar.set_postfix(loss=f"{position.sums['total'] / position.step_in_epoch:.3f}")
        if stopping:
            break
    bar.close()
    return not stopping


def log_steps(stage: Stage, position: Position, terms: dict[str, Tensor], run: Run) -> bool:
    """Bring the loss terms of the last steps ({term: [steps]}, on the device) to the host
    with one copy, log them, and tell whether any process was asked to stop. Raises
    NonFiniteLossError on every process, naming the first non-finite step and its terms,
    if any process saw one: the run stops before any checkpoint of a non-finite state."""
    values = torch.stack(list(terms.values()), dim=1).tolist()  # [steps][terms]
    bad = next((i for i, row in enumerate(values) if not all(map(math.isfinite, row))), None)
    # One collective for both questions: every process stops together, or one would wait
    # for the others forever.
    non_finite, stopping = any_rank(bad is not None, run.stop.requested, device=run.device)
    if non_finite:
        raise non_finite_error(stage, position, dict(zip(terms, values[bad or 0])),
                               len(values) - (bad or 0), run)
    first_step = position.global_step - len(values) + 1
    for offset, row in enumerate(values):
        run.logger.log_scalars({f"{stage.name}/loss/{k}": v for k, v in zip(terms, row)}, first_step + offset)
        for name, value in zip(terms, row):
            position.sums[name] = position.sums.get(name, 0.0) + value
    return stopping


def non_finite_error(stage: Stage, position: Position, values: dict[str, float], steps_back: int,
                     run: Run) -> NonFiniteLossError:
    last = run.dir / stage.last_name
    return NonFiniteLossError(
        f"non-finite loss in stage '{stage.name}' at epoch {position.epoch}, step "
        f"{position.step_in_epoch - steps_back} (global step {position.global_step - steps_back}): "
        + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        + (f". The last good checkpoint {last} was left untouched." if last.is_file() else
           f". No checkpoint of stage '{stage.name}' had been written yet."))


def save_checkpoints(stage: Stage, position: Position, metrics: dict, run: Run) -> None:
    """The stage's full state after an epoch; ``best.pt`` too when ``--best_metric`` improved."""
    # Only evaluated epochs compete (stage 1 has none); without ground truth (folder dataset,
    # labelled/unlabelled layout) best.pt is the last evaluated epoch.
    value = None if not metrics else metrics.get(run.args.best_metric) if run.args.ground_truth else position.epoch
    improved = value is not None and value > position.best
    if improved:
        position.best = value
    if run.info.is_main:
        if improved:
            stage.save(run.dir / "best.pt", position, run.args)
        stage.save(run.dir / stage.last_name, position, run.args)
    barrier()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, num_old: int, run: Run,
             cache: EvalCache | None = None) -> dict[str, float] | None:
    """Hungarian-matched All/Old/New accuracy of the visual, text and fused predictions on the
    images of ``loader`` (gathered from every process), and their number; None when a stop
    was requested meanwhile (the evaluation is abandoned)."""
    preds = predict_split(model, loader, run, cache)
    return None if preds is None else accuracies(preds, num_old, run.args.eval_func)


def accuracies(preds: dict[str, Tensor], num_old: int, eval_func: str) -> dict[str, float]:
    """{'<head>/<all|old|new>': accuracy, 'n_samples': N} of the predictions of ``predict_split``."""
    y_true = preds["target"].numpy()
    metrics = {"n_samples": len(y_true)}
    for head in HEADS:
        accs = log_accs_from_preds(y_true, preds[head].numpy(), y_true < num_old, eval_func=eval_func)
        metrics.update({f"{head}/{group}": float(acc) for group, acc in zip(("all", "old", "new"), accs)})
    return metrics


@torch.no_grad()
def predict_split(model: torch.nn.Module, loader: DataLoader, run: Run,
                  cache: EvalCache | None = None) -> dict[str, Tensor] | None:
    """The cluster of every image of ``loader`` by each head, its target and its index, in
    sample order over all processes; None when a stop was requested meanwhile."""
    model.eval()
    batches = cache.batches_of(model, loader, run) if cache else frozen_batches(model, loader, run)
    clusters, targets, indices = [], [], []
    for tokens, tes_out, target, uq_idx in tqdm(batches, total=len(loader), leave=False,
                                                disable=not (run.args.progress and run.info.is_main)):
        if any_rank(run.stop.requested, device=run.device)[0]:
            return None
        out = model.predict_from(tokens, tes_out)
        # One copy to the host per batch: [3, n] clusters in HEADS order.
        clusters.append(torch.stack([out[key].argmax(1) for key in ("v_logits", "t_logits", "fused_probs")]).cpu())
        targets.append(target)
        indices.append(torch.as_tensor(uq_idx))
    empty = torch.empty(0, dtype=torch.long)
    local = dict(zip(HEADS, torch.cat(clusters, dim=1) if clusters else [empty] * len(HEADS)))
    local.update(target=torch.cat(targets) if targets else empty, index=torch.cat(indices) if indices else empty)
    return gather_predictions(local, run.info)


def evaluate_run(model: torch.nn.Module, loaders: dict[str, DataLoader], num_old: int, run: Run,
                 caches: dict[str, EvalCache] | None = None) -> dict[str, float] | None:
    """Each split that has images (a folder dataset may have no test split) predicted, then
    {'<split>/<head>/<all|old|new>': accuracy, ...} where the classes of the unlabelled images
    are known, ``describe_clusters`` where they are not, and in both cases how alike the two
    heads cluster each split (``agreement_metrics``); None when a stop was requested."""
    preds = {}
    for split, loader in loaders.items():
        if len(loader.dataset):
            preds[split] = predict_split(model, loader, run, (caches or {}).get(split))
            if preds[split] is None:
                return None
    if not run.args.ground_truth:
        return describe_clusters(preds, num_old, run)
    return {**{f"{split}/{key}": value for split, split_preds in preds.items()
               for key, value in accuracies(split_preds, num_old, run.args.eval_func).items()},
            **agreement_metrics(preds)}


def epoch_evaluation(model: torch.nn.Module, splits: dict[str, DataLoader], run: Run) -> Callable[[int], dict | None]:
    """Stage 2's evaluation after an epoch: the unlabelled training images, and the test split
    at the end (or every --test_every epochs, or always when --best_metric reads it). A split
    evaluated more than once keeps its frozen part cached (--eval_cache_gb each)."""
    args, budget = run.args, int(run.args.eval_cache_gb * 2**30)
    test_always = args.best_metric.startswith("test/")
    repeated = ["train_unlabelled"] + (["test"] if args.test_every or test_always else [])
    caches = {split: EvalCache(split, budget) for split in repeated} if budget else {}

    def evaluate_epoch(epoch: int) -> dict | None:
        test_due = (epoch + 1 == args.epochs or test_always
                    or bool(args.test_every) and (epoch + 1) % args.test_every == 0)
        due = {split: loader for split, loader in splits.items() if split != "test" or test_due}
        return evaluate_run(model, due, args.num_labeled_classes, run, caches)

    return evaluate_epoch
