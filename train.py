"""Train GET on one dataset: stage 1 (the Text Embedding Synthesizer) then stage 2 (the
dual-branch GCD model), with evaluation, TensorBoard, checkpoints and resume.

    python train.py --dataset_name cub                  # both stages, paper settings
    python train.py --dataset_name cub --stage get --tes_checkpoint outputs/cub/.../tes.pt
    python train.py --dataset_name cub --resume auto    # pick up the latest run of --exp_name
    torchrun --nproc_per_node 4 train.py --dataset_name imagenet_1k

Everything a run writes goes to ``<exp_root>/<dataset>/<exp_name>-<timestamp>/``.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import config
from data.augmentations import TwoViews, get_transforms
from data.data_utils import count_skipped_images, skip_bad_images, train_sample_weights
from data.get_datasets import get_class_names, get_class_splits, get_datasets
from methods.get import get_loss
from methods.simgcd import teacher_temperature
from methods.tes import tes_loss
from model import (GETModel, TESStage, TextEmbeddingSynthesizer, class_text_embeddings,
                   format_parameter_summary, get_tokenizer, load_clip, register_tiny_clip, vision_depth,
                   vision_image_size)
from util.checkpoint import CheckpointError, atomic_save, load_checkpoint, rng_state, set_rng_state
from util.cluster_and_log_utils import log_accs_from_preds
from util.dist import (DistInfo, ShardSampler, WeightedEpochSampler, any_rank, barrier,
                       broadcast_object, cleanup_distributed, gather_predictions, init_distributed)
from util.logging_utils import RunLogger, environment_info, get_logger, save_json, setup_logging

REPO_DIR = Path(__file__).resolve().parent
# Mean-entropy weight of the paper per dataset (GET_SPEC §4); 1 elsewhere.
MEMAX_WEIGHT = {"cifar100": 4.0, "cub": 2.0}
HEADS = ("visual", "text", "fused")
SKIPPED_IMAGES = "skipped_images.txt"
# Flags that shape the stage-2 model: stored in its checkpoints, adopted by --stage eval.
ARCHITECTURE_FLAGS = ("grad_from_block", "use_projection", "shared_head", "head_hidden_dim",
                      "head_bottleneck_dim")


# ----------------------------------------------------------------------------- arguments
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="GET: generalized category discovery with CLIP (stage 1 TES, stage 2 GET).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default="cub", choices=config.DATASET_NAMES,
                   help="benchmark dataset (digits: the built-in demo)")
    g.add_argument("--data_root", default=None,
                   help="dataset folder; default: the GET_<NAME>_ROOT variable or ./datasets/<name>")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                   help="download CIFAR through torchvision if missing (CIFAR only)")
    g.add_argument("--prop_train_labels", type=float, default=0.5,
                   help="fraction of old-class training images that are labelled")
    g.add_argument("--normalization", default="imagenet", choices=("imagenet", "clip"),
                   help="image mean/std; the reference uses ImageNet statistics")
    g.add_argument("--num_workers", type=int, default=8, help="data-loading processes per GPU/process")
    g.add_argument("--skip_bad_images", action=argparse.BooleanOptionalAction, default=False,
                   help="replace unreadable images by another sample and count them, instead of stopping")

    g = p.add_argument_group("model")
    g.add_argument("--clip_model", default="ViT-B-16", help="open_clip architecture name")
    g.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag, a local checkpoint file, or 'none' (random init)")
    g.add_argument("--clip_cache_dir", default=None, help="open_clip download cache folder")
    g.add_argument("--grad_from_block", type=int, default=11,
                   help="visual transformer blocks from this index on are trained in stage 2")
    g.add_argument("--use_projection", action=argparse.BooleanOptionalAction, default=None,
                   help="visual branch keeps CLIP's visual projection (default: on for imagenet_1k only)")
    g.add_argument("--shared_head", action=argparse.BooleanOptionalAction, default=True,
                   help="one classification head for both branches, as the reference")
    g.add_argument("--head_hidden_dim", type=int, default=2048, help="hidden width of the head MLP")
    g.add_argument("--head_bottleneck_dim", type=int, default=256,
                   help="output width of the head MLP (the contrastive features)")
    g.add_argument("--shared_trunk", action=argparse.BooleanOptionalAction, default=True,
                   help="run the frozen image encoder once per image (--no-shared_trunk: the "
                        "reference's separate full encoders, same mathematics, slower)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=128,
                   help="samples per step over all processes (two views each)")
    g.add_argument("--lr", type=float, default=0.1, help="stage-2 learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (both stages)")
    g.add_argument("--weight_decay", type=float, default=5e-5, help="SGD weight decay (both stages)")
    g.add_argument("--epochs", type=int, default=200, help="stage-2 epochs")
    g.add_argument("--max_steps_per_epoch", type=int, default=None,
                   help="cut every epoch after this many steps (quick runs)")

    g = p.add_argument_group("stage 1")
    g.add_argument("--tes_epochs", type=int, default=200, help="stage-1 epochs")
    g.add_argument("--tes_lr", type=float, default=0.1, help="stage-1 learning rate")
    g.add_argument("--n_words", type=int, default=7, help="pseudo words per image")
    g.add_argument("--word_drop", type=float, default=0.0,
                   help="word dropout ratio in stage 1 (reference: 0, 0.5 when used)")
    g.add_argument("--prompt_template", default="a photo of a {}",
                   help="text of the old classes for distillation")
    g.add_argument("--tes_checkpoint", default=None,
                   help="stage-1 checkpoint for --stage get (default: tes.pt of the latest run "
                        "of the same --exp_name)")

    g = p.add_argument_group("stage 2")
    g.add_argument("--sup_weight", type=float, default=0.35,
                   help="lambda: weight of the supervised terms (1 - lambda for the unsupervised ones)")
    g.add_argument("--memax_weight", type=float, default=None,
                   help="mean-entropy weight (default: 4 cifar100, 2 cub, 1 otherwise)")
    g.add_argument("--warmup_teacher_temp", type=float, default=0.07,
                   help="teacher temperature at the first epoch")
    g.add_argument("--teacher_temp", type=float, default=0.04,
                   help="teacher temperature after the warm-up")
    g.add_argument("--warmup_teacher_temp_epochs", type=int, default=30,
                   help="epochs of the linear teacher-temperature warm-up")
    g.add_argument("--cico_weight", type=float, default=1.0, help="lambda_C of the CICO loss")
    g.add_argument("--eval_func", default="v2", choices=("v2", "v2b"),
                   help="Hungarian accuracy: v2 (sample-averaged) or v2b (class-balanced)")
    g.add_argument("--best_metric", default="train_unlabelled/fused/all",
                   help="evaluation metric that selects best.pt")

    g = p.add_argument_group("runtime")
    g.add_argument("--stage", default="all", choices=("tes", "get", "all", "eval"),
                   help="'eval' evaluates the stage-2 checkpoint given by --eval_checkpoint")
    g.add_argument("--eval_checkpoint", default=None, help="stage-2 last.pt / best.pt for --stage eval")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA, off on CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the stage-2 model")
    g.add_argument("--seed", type=int, default=0, help="seed of every random generator")
    g.add_argument("--exp_root", default=None, help="output root; default GET_OUTPUT_ROOT or ./outputs")
    g.add_argument("--exp_name", default="get", help="name of the run folders (and of --resume auto)")
    g.add_argument("--resume", default=None,
                   help="'auto' (latest run of --exp_name) or the path of a last.pt / tes_last.pt")
    g.add_argument("--eval_every", type=int, default=1, help="evaluate every N stage-2 epochs")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default: only when attached to a terminal)")
    return p


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill dataset-dependent defaults and refuse invalid combinations before any work."""
    if args.pretrained and args.pretrained.lower() == "none":
        args.pretrained = None
    if args.memax_weight is None:
        args.memax_weight = MEMAX_WEIGHT.get(args.dataset_name, 1.0)
    if args.use_projection is None:
        args.use_projection = args.dataset_name == "imagenet_1k"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.amp is None:
        args.amp = args.device.startswith("cuda")
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    checks = [
        (0 < args.prop_train_labels <= 1, "--prop_train_labels must be in (0, 1]"),
        (args.batch_size >= 2, "--batch_size must be at least 2 (two views per sample are paired)"),
        (args.epochs >= 1 and args.tes_epochs >= 1, "--epochs and --tes_epochs must be >= 1"),
        (args.n_words >= 1, "--n_words must be >= 1"),
        (0 <= args.word_drop < 1, "--word_drop must be in [0, 1)"),
        (args.lr > 0 and args.tes_lr > 0, "learning rates must be > 0"),
        (args.eval_every >= 1, "--eval_every must be >= 1"),
        (args.num_workers >= 0, "--num_workers must be >= 0"),
        (args.max_steps_per_epoch is None or args.max_steps_per_epoch >= 1,
         "--max_steps_per_epoch must be >= 1"),
        (args.device == "cpu" or args.device.startswith("cuda"), "--device must be auto, cpu or cuda[:N]"),
        (not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} asked for, but CUDA is not available; use --device cpu"),
        ("{}" in args.prompt_template, "--prompt_template needs a '{}' for the class name"),
        ((args.stage == "eval") == bool(args.eval_checkpoint),
         "--stage eval and --eval_checkpoint PATH go together"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    try:
        depth = vision_depth(args.clip_model)
    except ValueError as err:
        parser.error(str(err))
    if not 0 <= args.grad_from_block <= depth:
        parser.error(f"--grad_from_block must be in [0, {depth}] for {args.clip_model} "
                     f"({depth} visual blocks); got {args.grad_from_block}")
    best_prefixes = tuple(f"{split}/{head}/" for split in ("train_unlabelled", "test") for head in HEADS)
    if not (args.best_metric.startswith(best_prefixes)
            and args.best_metric.rsplit("/", 1)[1] in ("all", "old", "new")):
        parser.error("--best_metric must look like train_unlabelled/fused/all "
                     "(split: train_unlabelled|test, head: visual|text|fused, all|old|new)")


# ----------------------------------------------------------------------------- run folder
def experiment_dir(args: argparse.Namespace) -> Path:
    return config.output_root(args.exp_root) / args.dataset_name


def latest_run(args: argparse.Namespace, *needs: str) -> Path | None:
    """Newest run folder of ``--exp_name`` (not of a longer name that starts with it) that
    holds one of the files ``needs``."""
    pattern = re.compile(re.escape(args.exp_name) + r"-\d{8}-\d{6}-\d{6}")
    runs = sorted(r for r in experiment_dir(args).glob(f"{args.exp_name}-*") if pattern.fullmatch(r.name))
    found = [r for r in runs if any((r / name).is_file() for name in needs)]
    return found[-1] if found else None


def choose_run_dir(args: argparse.Namespace, info: DistInfo) -> Path:
    """A new timestamped folder, or the folder of the run being resumed."""
    if args.resume == "auto":
        run = latest_run(args, "last.pt", "tes_last.pt")
        if run is not None:
            return run
        args.resume = None  # nothing to resume yet: a fresh run, reported in the log
    elif args.resume:
        path = Path(args.resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint file (expected a last.pt "
                                  "or tes_last.pt written by train.py, or 'auto')")
        return path.parent
    stamp = broadcast_object(datetime.now().strftime("%Y%m%d-%H%M%S-%f"), info)
    return experiment_dir(args) / f"{args.exp_name}-{stamp}"


# ----------------------------------------------------------------------------- training loop
@dataclass
class LoopState:
    """Position of a training stage; saved in every checkpoint."""
    epoch: int = 0            # completed epochs
    step_in_epoch: int = 0    # steps of the current epoch already trained (interrupted runs)
    global_step: int = 0
    sums: dict = field(default_factory=dict)  # running sums of loss components this epoch
    best: float = -1.0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "sums": dict(self.sums), "best": self.best}


class StopSignal:
    """SIGINT/SIGTERM ask the loop to finish its step, save ``last.pt`` and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True
        get_logger().warning("received signal %d: stopping after the current step", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Trainer:
    """What one stage needs to train: the model, its optimiser, the loss and where to save."""
    name: str                      # 'tes' or 'get'
    model: torch.nn.Module         # possibly DDP-wrapped
    module: torch.nn.Module        # the unwrapped model (checkpointing)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable              # (model, images, labels, labelled, epoch) -> (loss, components)
    meta: dict
    last_path: Path
    extra: dict = field(default_factory=dict)  # frozen state saved along (stage 2: the TES)


def make_optimizer(params, lr: float, args: argparse.Namespace, epochs: int):
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=lr * 1e-3)
    return optimizer, scheduler


def save_state(tr: Trainer, state: LoopState, args: argparse.Namespace, path: Path) -> None:
    atomic_save({
        "meta": tr.meta, "stage": tr.name, "loop": state.to_dict(),
        "model": tr.module.trainable_state_dict(),
        "optimizer": tr.optimizer.state_dict(), "scheduler": tr.scheduler.state_dict(),
        "rng": rng_state(), "args": json.loads(json.dumps(vars(args), default=str)),
        **tr.extra,
    }, path)


def restore_state(tr: Trainer, path: Path) -> LoopState:
    ckpt = load_checkpoint(path, expect=tr.meta)
    if ckpt.get("stage") != tr.name:
        raise CheckpointError(f"{path} is a '{ckpt.get('stage')}' checkpoint, expected '{tr.name}'")
    tr.module.load_trainable_state_dict(ckpt["model"])
    tr.optimizer.load_state_dict(ckpt["optimizer"])
    tr.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return LoopState(**ckpt["loop"])


def autocast_context(args):
    """bf16 autocast for --amp (weights stay fp32), else nothing."""
    if not args.amp:
        return nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)


def train_one_epoch(tr: Trainer, loader: DataLoader, state: LoopState, args, info: DistInfo,
                    runlog: RunLogger, stop: StopSignal) -> bool:
    """Train until the epoch ends (True) or a stop was requested (False)."""
    device = torch.device(args.device)
    tr.model.train()
    n_steps = len(loader) + state.step_in_epoch
    if args.max_steps_per_epoch:
        n_steps = min(n_steps, args.max_steps_per_epoch)
    bar = tqdm(total=n_steps, initial=state.step_in_epoch, disable=not args.progress or not info.is_main,
               desc=f"{tr.name} epoch {state.epoch}", leave=False, dynamic_ncols=True)
    autocast = autocast_context(args)
    for views, labels, _, labelled in loader:
        if state.step_in_epoch >= n_steps:
            break
        images = torch.cat(views, dim=0).to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True).repeat(2)
        labelled = labelled.to(device, non_blocking=True).bool().repeat(2)
        with autocast:
            loss, parts = tr.loss_fn(tr.model, images, labels, labelled, state.epoch)
        parts = {"total": loss, **parts}
        # One device-to-host copy for all terms, not one synchronisation per term.
        values = dict(zip(parts, torch.stack([v.detach().float() for v in parts.values()]).tolist()))
        # One collective per step tells every process whether any process saw a non-finite
        # loss or a stop signal: all of them stop together, or one would wait for the others.
        non_finite, stop_requested = any_rank(
            not all(math.isfinite(v) for v in values.values()), stop.requested, device=device)
        if non_finite:
            raise NonFiniteLossError(
                f"non-finite loss in stage '{tr.name}' at epoch {state.epoch}, step "
                f"{state.step_in_epoch} (global step {state.global_step}): "
                + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                + f". The last good checkpoint {tr.last_path} was left untouched.")
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tr.optimizer.step()
        state.step_in_epoch += 1
        state.global_step += 1
        for k, v in values.items():
            state.sums[k] = state.sums.get(k, 0.0) + v
        runlog.log_scalars({f"{tr.name}/loss/{k}": v for k, v in values.items()}, state.global_step)
        bar.update(1)
        bar.set_postfix(loss=f"{values['total']:.3f}")
        if stop_requested:  # the step is finished: now stop
            bar.close()
            return False
    bar.close()
    return True


def run_stage(tr: Trainer, loader: DataLoader, sampler: WeightedEpochSampler, epochs: int,
              args, info: DistInfo, runlog: RunLogger, stop: StopSignal,
              end_of_epoch: Callable[[LoopState], dict]) -> LoopState | None:
    """Epoch loop shared by both stages: resume, train, log, checkpoint. None if stopped early."""
    log = get_logger()
    state = restore_state(tr, tr.last_path) if tr.last_path.is_file() else LoopState()
    if state.epoch or state.step_in_epoch:
        log.info("stage %s: resuming from %s at epoch %d, step %d",
                 tr.name, tr.last_path, state.epoch, state.step_in_epoch)
    while state.epoch < epochs:
        sampler.set_epoch(state.epoch, skip=state.step_in_epoch * loader.batch_size)
        loader.generator.manual_seed(args.seed * 100_003 + state.epoch)
        start = time.time()
        finished = train_one_epoch(tr, loader, state, args, info, runlog, stop)
        if not finished:
            if info.is_main:
                save_state(tr, state, args, tr.last_path)
            log.warning("stopped on request; state saved to %s (resume with --resume auto)",
                        tr.last_path)
            return None
        lr = tr.optimizer.param_groups[0]["lr"]
        means = {k: v / max(state.step_in_epoch, 1) for k, v in state.sums.items()}
        tr.scheduler.step()
        record = {"stage": tr.name, "epoch": state.epoch, "lr": lr, "loss": means,
                  "seconds": round(time.time() - start, 3)}
        record.update(end_of_epoch(state))
        state.epoch += 1
        state.step_in_epoch = 0
        state.sums = {}
        runlog.log_scalars({f"{tr.name}/lr": lr,
                            **{f"{tr.name}/epoch_loss/{k}": v for k, v in means.items()}},
                           state.epoch - 1)
        skip_log = tr.last_path.with_name(SKIPPED_IMAGES)
        skipped = count_skipped_images(skip_log) if args.skip_bad_images else 0
        if skipped:
            record["skipped_images"] = skipped
            log.warning("skipped %d unreadable images so far (listed in %s)", skipped, skip_log)
        runlog.log_epoch(record)
        log.info("%s epoch %d/%d  loss %.4f  lr %.4g  (%.1fs)%s", tr.name, state.epoch, epochs,
                 means.get("total", float("nan")), lr, record["seconds"],
                 format_eval(record.get("eval", {})))
        if record.get("is_best"):
            state.best = record["best_value"]
        if info.is_main:
            if record.get("is_best"):
                save_state(tr, state, args, tr.last_path.with_name("best.pt"))
            save_state(tr, state, args, tr.last_path)
        barrier()
    return state


def format_eval(metrics: dict) -> str:
    if not metrics:
        return ""
    rows = [f"\n    {split:<17}" + "  ".join(
        f"{head} {metrics[f'{split}/{head}/all']:.4f}/{metrics[f'{split}/{head}/old']:.4f}/"
        f"{metrics[f'{split}/{head}/new']:.4f}" for head in HEADS)
        for split in ("train_unlabelled", "test") if f"{split}/visual/all" in metrics]
    return "  (All/Old/New)" + "".join(rows)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: GETModel, loader: DataLoader, num_old: int, args, info: DistInfo,
             desc: str) -> dict[str, float]:
    """Hungarian-matched All/Old/New accuracy of the visual, text and fused predictions."""
    device = torch.device(args.device)
    model.eval()
    local = {k: [] for k in ("index", "target", *HEADS)}
    autocast = autocast_context(args)
    for images, targets, uq_idx in tqdm(loader, desc=desc, leave=False,
                                        disable=not args.progress or not info.is_main):
        with autocast:
            out = model.predict(images.to(device, non_blocking=True))
        local["visual"].append(out["v_logits"].argmax(1).cpu())
        local["text"].append(out["t_logits"].argmax(1).cpu())
        local["fused"].append(out["fused_probs"].argmax(1).cpu())
        local["target"].append(targets)
        local["index"].append(torch.as_tensor(uq_idx))
    preds = gather_predictions({k: torch.cat(v) if v else torch.empty(0, dtype=torch.long)
                                for k, v in local.items()}, info)
    y_true = preds["target"].numpy()
    old_mask = y_true < num_old
    metrics = {"n_samples": int(len(y_true))}
    for head in HEADS:
        acc = log_accs_from_preds(y_true, preds[head].numpy(), old_mask, eval_func=args.eval_func)
        metrics.update({f"{head}/{k}": float(v) for k, v in zip(("all", "old", "new"), acc)})
    return metrics


# ----------------------------------------------------------------------------- data
def build_loaders(args, info: DistInfo, run_dir: Path):
    """Training loader (two views, weighted sampler) and the two evaluation loaders."""
    get_class_splits(args)
    train_tf, test_tf = get_transforms(image_size=vision_image_size(args.clip_model),
                                       normalization=args.normalization)
    train_set, test_set, unlabelled_eval_set, _ = get_datasets(
        args.dataset_name, TwoViews(train_tf), test_tf, args)
    if args.skip_bad_images:
        skip_bad_images([train_set, test_set, unlabelled_eval_set], run_dir / SKIPPED_IMAGES)
    per_rank_batch = args.batch_size // info.world_size
    if per_rank_batch < 2:
        raise ValueError(f"--batch_size {args.batch_size} over {info.world_size} processes leaves "
                         "fewer than 2 samples per process; raise --batch_size")
    cuda = args.device.startswith("cuda")
    common = dict(num_workers=args.num_workers, pin_memory=cuda,
                  # Persistent workers keep their RNG across epochs, which breaks bit-exact
                  # resume; use them only where speed matters (CUDA).
                  persistent_workers=cuda and args.num_workers > 0)
    sampler = WeightedEpochSampler(train_sample_weights(train_set), len(train_set), args.seed,
                                   info.rank, info.world_size)
    if len(sampler) < per_rank_batch:
        raise ValueError(f"the training set of {args.dataset_name} has {len(train_set)} images, "
                         f"fewer than one batch ({args.batch_size}); lower --batch_size")
    # A loader-owned generator keeps the global RNG untouched when an epoch's iterator starts
    # (exact resume) and is re-seeded per epoch in run_stage, fixing the worker seeds.
    train_loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler,
                              drop_last=True, generator=torch.Generator(), **common)

    def eval_loader(ds):
        return DataLoader(ds, batch_size=per_rank_batch, shuffle=False,
                          sampler=ShardSampler(len(ds), info.rank, info.world_size), **common)

    return train_loader, sampler, eval_loader(unlabelled_eval_set), eval_loader(test_set)


# ----------------------------------------------------------------------------- stages
def clip_meta(args, clip) -> dict:
    """What a checkpoint must agree on with this run to be usable."""
    return {"dataset": args.dataset_name, "num_old": len(args.train_classes),
            "num_classes": len(args.train_classes) + len(args.unlabeled_classes),
            "clip_model": args.clip_model, "n_words": args.n_words}


def wrap_ddp(module: torch.nn.Module, info: DistInfo, args) -> torch.nn.Module:
    if not info.enabled:
        return module
    ids = [info.local_rank] if args.device.startswith("cuda") else None
    # The models' buffers (attention masks, token ids, the heads' fixed norms) never change:
    # no need to broadcast them before every forward.
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def train_tes(args, clip, tokenizer, class_names, loader, sampler, run_dir: Path, info,
              runlog, stop) -> Path | None:
    """Stage 1: train the TES projector; returns the path of ``tes.pt`` (None if stopped)."""
    device = torch.device(args.device)
    tes = TextEmbeddingSynthesizer(clip, n_words=args.n_words, word_drop=args.word_drop)
    stage = TESStage(clip, tes, shared_encoder=args.shared_trunk).to(device)
    num_old = len(args.train_classes)
    class_text = class_text_embeddings(clip, tokenizer, class_names[:num_old],
                                       template=args.prompt_template).to(device)
    logit_scale = float(clip.logit_scale.exp())
    optimizer, scheduler = make_optimizer(tes.projector.parameters(), args.tes_lr, args, args.tes_epochs)
    log_parameters(stage)

    def loss_fn(model, images, labels, labelled, epoch):
        f, t = model(images)
        return tes_loss(f.float(), t.float(), logit_scale, labels, labelled, class_text)

    tr = Trainer("tes", wrap_ddp(stage, info, args), stage, optimizer, scheduler, loss_fn,
                 clip_meta(args, clip), run_dir / "tes_last.pt")
    if run_stage(tr, loader, sampler, args.tes_epochs, args, info, runlog, stop,
                 end_of_epoch=lambda state: {}) is None:
        return None
    out = run_dir / "tes.pt"
    if info.is_main:
        atomic_save({"meta": tr.meta, "projector": tes.projector.state_dict()}, out)
        get_logger().info("stage 1 done: TES saved to %s", out)
    barrier()
    return out


def find_tes_checkpoint(args, run_dir: Path) -> Path:
    if args.tes_checkpoint:
        return Path(args.tes_checkpoint)
    if (run_dir / "tes.pt").is_file():
        return run_dir / "tes.pt"
    found = latest_run(args, "tes.pt")
    if found is None:
        raise CheckpointError(
            f"--stage get needs a stage-1 checkpoint: none found for --exp_name {args.exp_name} "
            f"under {experiment_dir(args)}. Run --stage tes (or --stage all) first, or pass "
            "--tes_checkpoint PATH.")
    return found / "tes.pt"


def train_get(args, clip, tes_path: Path, loader, sampler, unlabelled_loader, test_loader,
              run_dir: Path, info, runlog, stop) -> dict | None:
    """Stage 2: train the dual-branch model; returns the final evaluation (None if stopped)."""
    meta = clip_meta(args, clip)
    tes_ckpt = load_checkpoint(tes_path, expect=meta)
    get_logger().info("stage 2: TES from %s", tes_path)
    if tes_path.resolve() != (run_dir / "tes.pt").resolve() and info.is_main:
        # The run folder keeps the TES it was trained with, so a resume finds the same one.
        atomic_save(tes_ckpt, run_dir / "tes.pt")
    model = build_get_model(args, clip, tes_ckpt["projector"], meta["num_classes"])
    log_parameters(model)
    optimizer, scheduler = make_optimizer(model.trainable_parameters(), args.lr, args, args.epochs)
    forward = torch.compile(model) if args.compile else model

    def loss_fn(net, images, labels, labelled, epoch):
        temp = teacher_temperature(epoch, args.warmup_teacher_temp, args.teacher_temp,
                                   args.warmup_teacher_temp_epochs)
        out = {k: v.float() for k, v in net(images).items()}
        return get_loss(out, labels, labelled, temp, sup_weight=args.sup_weight,
                        memax_weight=args.memax_weight, cico_weight=args.cico_weight)

    meta = {**meta, **{key: getattr(args, key) for key in ARCHITECTURE_FLAGS}}
    tr = Trainer("get", wrap_ddp(forward, info, args), model, optimizer, scheduler, loss_fn,
                 meta, run_dir / "last.pt", extra={"tes_projector": model.tes.projector.state_dict()})
    final = {}

    def end_of_epoch(state: LoopState) -> dict:
        temp = teacher_temperature(state.epoch, args.warmup_teacher_temp, args.teacher_temp,
                                   args.warmup_teacher_temp_epochs)
        runlog.log_scalars({"get/teacher_temp": temp}, state.epoch)
        last = state.epoch + 1 == args.epochs
        if (state.epoch + 1) % args.eval_every and not last:
            return {"teacher_temp": temp}
        metrics = evaluate_splits(model, unlabelled_loader, test_loader, meta["num_old"], args, info)
        runlog.log_scalars({f"eval/{k}": v for k, v in metrics.items() if "n_samples" not in k},
                           state.epoch)
        final.clear()
        final.update(metrics)
        value = metrics[args.best_metric]
        return {"teacher_temp": temp, "eval": metrics, "is_best": value > state.best,
                "best_value": value}

    state = run_stage(tr, loader, sampler, args.epochs, args, info, runlog, stop, end_of_epoch)
    if state is None:
        return None
    if not final:  # resumed after the last epoch: evaluate the finished model once more
        final.update(end_of_epoch(LoopState(epoch=args.epochs - 1)).get("eval", {}))
    return final


def build_get_model(args, clip, tes_projector: dict, num_classes: int) -> GETModel:
    tes = TextEmbeddingSynthesizer(clip, n_words=args.n_words)
    tes.projector.load_state_dict(tes_projector)
    return GETModel(clip, tes, num_classes=num_classes, grad_from_block=args.grad_from_block,
                    use_projection=args.use_projection, shared_head=args.shared_head,
                    shared_trunk=args.shared_trunk, head_hidden_dim=args.head_hidden_dim,
                    head_bottleneck_dim=args.head_bottleneck_dim).to(torch.device(args.device))


def evaluate_splits(model, unlabelled_loader, test_loader, num_old: int, args, info) -> dict:
    """Transductive (unlabelled training images) and inductive (test split) evaluation."""
    metrics = {}
    for split, eval_loader in (("train_unlabelled", unlabelled_loader), ("test", test_loader)):
        res = evaluate(model, eval_loader, num_old, args, info, desc=f"eval {split}")
        metrics.update({f"{split}/{k}": v for k, v in res.items()})
    return metrics


def evaluate_checkpoint(args, clip, unlabelled_loader, test_loader, info) -> dict:
    """--stage eval: the metrics of a stage-2 checkpoint, whose architecture flags it carries."""
    meta = clip_meta(args, clip)
    ckpt = load_checkpoint(args.eval_checkpoint, expect=meta)
    if ckpt.get("stage") != "get":
        raise CheckpointError(f"--eval_checkpoint {args.eval_checkpoint} is not a stage-2 "
                              "checkpoint (last.pt or best.pt of a stage-2 run)")
    for key in ARCHITECTURE_FLAGS:
        setattr(args, key, ckpt["meta"][key])
    model = build_get_model(args, clip, ckpt["tes_projector"], meta["num_classes"])
    model.load_trainable_state_dict(ckpt["model"])
    return evaluate_splits(model, unlabelled_loader, test_loader, meta["num_old"], args, info)


def log_parameters(model) -> None:
    """Freezing made visible: trainable / total parameters of each part."""
    get_logger().info("parameters:\n%s", format_parameter_summary(model.parameter_summary()))


# ----------------------------------------------------------------------------- main
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> dict:
    """Run the stages that ``--stage`` asks for; returns the final stage-2 metrics (or {})."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    register_tiny_clip()
    resolve_args(args, parser)
    info = init_distributed("cuda" if args.device.startswith("cuda") else "cpu")
    if args.device.startswith("cuda"):
        # TF32 for the fp32 matrix products outside autocast (the losses, the heads' norms).
        torch.set_float32_matmul_precision("high")
    if info.enabled and args.device.startswith("cuda"):
        args.device = f"cuda:{info.local_rank}"
    try:
        return run(args, info)
    finally:
        cleanup_distributed()


def run(args: argparse.Namespace, info: DistInfo) -> dict:
    run_dir = choose_run_dir(args, info)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()  # the folder exists before any rank writes into it
    log = setup_logging(run_dir / "log.txt", info.is_main)
    log.info("run folder: %s", run_dir)
    # The data first: a missing dataset is reported before minutes of CLIP loading.
    loader, sampler, unlabelled_loader, test_loader = build_loaders(args, info, run_dir)
    class_names = get_class_names(args)
    # Seeding before CLIP is built makes the randomly initialised tiny CLIP identical in every
    # process and in resumed runs; the OpenAI weights are loaded, not drawn.
    seed_everything(args.seed)
    clip = load_clip(args.clip_model, args.pretrained, device=args.device, cache_dir=args.clip_cache_dir)
    tokenizer = get_tokenizer(args.clip_model)
    if info.is_main:
        save_json(vars(args), run_dir / "config.json")
        save_json(environment_info(REPO_DIR), run_dir / "environment.json")
    log.info("dataset %s: %d labelled + %d unlabelled training images, %d old + %d new classes",
             args.dataset_name, loader.dataset.n_labelled, loader.dataset.n_unlabelled,
             len(args.train_classes), len(args.unlabeled_classes))
    seed_everything(args.seed)
    runlog = RunLogger(run_dir, enabled=info.is_main)
    try:
        with StopSignal() as stop:
            return run_stages(args, clip, tokenizer, class_names, loader, sampler,
                              unlabelled_loader, test_loader, run_dir, info, runlog, stop)
    finally:
        runlog.close()


def run_stages(args, clip, tokenizer, class_names, loader, sampler, unlabelled_loader,
               test_loader, run_dir, info, runlog, stop) -> dict:
    log = get_logger()
    if args.stage == "eval":
        metrics = evaluate_checkpoint(args, clip, unlabelled_loader, test_loader, info)
        log.info("accuracy of %s (%s)%s", args.eval_checkpoint, args.eval_func, format_eval(metrics))
        if info.is_main:
            save_json(metrics, run_dir / "eval_metrics.json")
        return metrics
    if args.stage == "get":
        tes_path = find_tes_checkpoint(args, run_dir)
    elif (run_dir / "tes.pt").is_file():
        tes_path = run_dir / "tes.pt"
        log.info("stage 1 already finished in this run: using %s", tes_path)
    else:
        tes_path = train_tes(args, clip, tokenizer, class_names, loader, sampler, run_dir, info,
                             runlog, stop)
    if tes_path is None or args.stage == "tes":
        return {}
    metrics = train_get(args, clip, tes_path, loader, sampler, unlabelled_loader, test_loader,
                        run_dir, info, runlog, stop)
    if metrics is None:
        return {}
    log.info("final accuracy (%s)%s", args.eval_func, format_eval(metrics))
    log.info("TensorBoard: tensorboard --logdir %s", run_dir / "tensorboard")
    if info.is_main:
        save_json(metrics, run_dir / "final_metrics.json")
    return metrics


if __name__ == "__main__":
    main()
