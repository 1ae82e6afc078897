"""One epoch of training, the same for both stages: ``train_one_epoch`` runs a ``Stage``'s step
over the epoch's batches from a ``Position`` (so an interrupted epoch resumes exactly), logs
every loss term, stops on a non-finite loss or a stop request.

What a stage's step computes is in methods/ (``methods.tes.TESStep``, ``methods.get.GETStep``);
the epoch loop around this, with evaluation and checkpoints, is ``fit`` in train.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from errors import NonFiniteLossError
from util.dist import DistInfo, any_rank
from util.logging_utils import RunLogger
from util.signals import StopSignal

# (images [2B, 3, H, W], labels [2B], labelled [2B] bool, epoch, step in the epoch)
#   -> (loss, {term: value}); the rows are view 1 of the batch's samples, then view 2.
Step = Callable[[Tensor, Tensor, Tensor, int, int], tuple[Tensor, dict[str, Tensor]]]


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


@dataclass
class Stage:
    """One training stage: what trains, its step, its optimiser, and what its checkpoints record."""
    name: str                  # vocabulary.STAGE1 or STAGE2: checkpoint and log prefix
    model: torch.nn.Module     # the unwrapped model: its trainable part is checkpointed
    step: Step                 # the loss of a batch (runs the possibly DDP-wrapped or compiled model)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epochs: int
    meta: dict                 # what a checkpoint must agree on with this run
    last_checkpoint: Path      # where the stage's latest full state is saved
    schedule: Callable[[int], dict] = lambda epoch: {}  # per-epoch values logged (teacher temp.)


@dataclass
class Loop:
    """What the training loop needs of the run around it."""
    device: torch.device
    info: DistInfo
    logger: RunLogger
    stop: StopSignal
    log_every: int = 10                    # bring the loss terms to the host every N steps
    max_steps_per_epoch: int | None = None
    progress: bool = False


def sgd_cosine(params, lr: float, epochs: int, momentum: float, weight_decay: float):
    """SGD, cosine-annealed to lr/1000 over ``epochs`` (stepped once per epoch; both stages)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=lr * 1e-3)


def train_one_epoch(stage: Stage, loader: DataLoader, position: Position, loop: Loop) -> bool:
    """Train from ``position`` to the end of its epoch (True) or until a stop request (False).

    The epoch's draw and every sample's augmentation depend on (seed, stage, epoch, position)
    only, and the batches already trained in this epoch are skipped: a resumed epoch sees
    exactly the batches that an uninterrupted one would, whatever the processes and loader
    workers.
    """
    loader.sampler.set_epoch(position.epoch, skip=position.step_in_epoch * loader.batch_size,
                             stage=stage.name)
    n_steps = len(loader) + position.step_in_epoch
    if loop.max_steps_per_epoch:
        n_steps = min(n_steps, loop.max_steps_per_epoch)
    stage.model.train()
    bar = tqdm(total=n_steps, initial=position.step_in_epoch, leave=False, dynamic_ncols=True,
               desc=f"{stage.name} epoch {position.epoch}", disable=not (loop.progress and loop.info.is_main))
    pending: list[Tensor] = []  # loss terms of the steps not yet brought to the host
    stopping = False
    for views, labels, _, labelled in loader:
        if position.step_in_epoch >= n_steps:
            break
        # Each view is a pinned tensor: copied while the previous step still runs.
        images = torch.cat([view.to(loop.device, non_blocking=True) for view in views])  # view 1, view 2
        labels = labels.to(loop.device, non_blocking=True).repeat(2)
        labelled = labelled.to(loop.device, non_blocking=True).bool().repeat(2)
        loss, terms = stage.step(images, labels, labelled, position.epoch, position.step_in_epoch)
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stage.optimizer.step()
        names = ["total", *terms]
        pending.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())]))
        position.step_in_epoch += 1
        position.global_step += 1
        bar.update(1)
        if len(pending) == loop.log_every or position.step_in_epoch >= n_steps:
            stopping = log_steps(stage, position, dict(zip(names, torch.stack(pending).T)), loop)
            pending = []
            bar.set_postfix(loss=f"{position.sums['total'] / position.step_in_epoch:.3f}")
        if stopping:
            break
    bar.close()
    return not stopping


def log_steps(stage: Stage, position: Position, terms: dict[str, Tensor], loop: Loop) -> bool:
    """Bring the loss terms of the last steps ({term: [steps]}, on the device) to the host
    with one copy, log them, and tell whether any process was asked to stop. Raises
    NonFiniteLossError on every process, naming the first non-finite step and its terms,
    if any process saw one: the run stops before any checkpoint of a non-finite state."""
    values = torch.stack(list(terms.values()), dim=1).tolist()  # [steps][terms]
    bad = next((i for i, row in enumerate(values) if not all(map(math.isfinite, row))), None)
    # One collective for both questions: every process stops together, or one would wait
    # for the others forever.
    non_finite, stopping = any_rank(bad is not None, loop.stop.requested, device=loop.device)
    if non_finite:
        raise non_finite_error(stage, position, dict(zip(terms, values[bad or 0])), len(values) - (bad or 0))
    first_step = position.global_step - len(values) + 1
    for offset, row in enumerate(values):
        loop.logger.log_scalars({f"{stage.name}/loss/{k}": v for k, v in zip(terms, row)}, first_step + offset)
        for name, value in zip(terms, row):
            position.sums[name] = position.sums.get(name, 0.0) + value
    return stopping


def non_finite_error(stage: Stage, position: Position, values: dict[str, float], steps_back: int) -> NonFiniteLossError:
    last = stage.last_checkpoint
    return NonFiniteLossError(
        f"non-finite loss in stage '{stage.name}' at epoch {position.epoch}, step "
        f"{position.step_in_epoch - steps_back} (global step {position.global_step - steps_back}): "
        + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        + (f". The last good checkpoint {last} was left untouched." if last.is_file() else
           f". No checkpoint of stage '{stage.name}' had been written yet."))


def format_parameter_summary(rows: list[tuple[str, int, int]]) -> str:
    """A small table of a stage model's ``parameter_summary()`` rows with a total line."""
    lines = [f"{name:<40s} trainable {trainable:>12,d} / {total:>12,d}"
             for name, trainable, total in rows]
    trainable, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{'total':<40s} trainable {trainable:>12,d} / {total:>12,d}")
    return "\n".join(lines)
