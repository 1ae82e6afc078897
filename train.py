"""Train GET on one dataset: stage 1 (the Text Embedding Synthesizer), then stage 2 (the
dual-branch GCD model), with evaluation, TensorBoard, checkpoints and resume.

    python train.py --dataset_name cub                  # both stages, paper settings
    python train.py --dataset_name cub --stage get --tes_checkpoint outputs/cub/.../tes.pt
    python train.py --dataset_name cub --resume auto    # pick up the latest run of --exp_name
    torchrun --nproc_per_node 4 train.py --dataset_name imagenet_1k

Flags: params.py. The epoch loop, evaluation, checkpoints: engine.py. Models: model.py. Losses:
methods/. Everything a run writes goes to ``<exp_root>/<dataset>/<exp_name>-<timestamp>/``.
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from data.data_utils import ImageLoadError
from data.get_datasets import get_class_splits
from data.image_cache import ImageCacheError
from data.loaders import Loaders, build_loaders
from engine import (NonFiniteLossError, Stage, checkpoint_meta, epoch_evaluation, evaluate_run, fit,
                    sgd_cosine)
from methods.get import get_loss
from methods.simgcd import teacher_temperature
from methods.tes import tes_loss
from model import (TESStage, TextEmbeddingSynthesizer, build_clip, build_get_model, class_text_embeddings,
                   get_model_from_checkpoint, get_tokenizer, sample_keep_mask, vision_image_size)
from params import ARCHITECTURE_FLAGS, flag_names, parse_args
from util.checkpoint import CheckpointError, atomic_save, load_checkpoint, load_stage2_checkpoint
from util.dist import DistInfo, barrier, cleanup_distributed, gather_views, init_distributed, local_rows, wrap_ddp
from util.estimate_k import estimate_for_run, k_from_checkpoint
from util.logging_utils import get_logger, setup_logging
from util.reporting import report
from util.resume import Resume, find_resume
from util.rng import derive_seed, seed_everything
from util.runs import Run, RunLockedError, find_tes_checkpoint, new_run_dir, open_run


def main(argv: list[str] | None = None) -> dict:
    """Run the stages that ``--stage`` asks for; returns the final stage-2 metrics ({} if none)."""
    args = parse_args(argv)
    info = init_distributed(args.device)
    args.device = info.device(args.device)
    setup_logging(None, info.is_main)
    try:
        # Every input is checked, the dataset first, before the run folder is made or touched.
        get_class_splits(args)
        k_from_checkpoint(args)  # K to estimate (--num_classes auto), but a checkpoint to continue: its K
        resume = find_resume(args, checkpoint_meta(args), flag_names())
        run_dir = resume.run_dir if resume else new_run_dir(args, info)
        data = build_loaders(args, vision_image_size(args.clip_model), info, run_dir)
        clip = build_clip(args)
        with open_run(args, info, run_dir, resume) as run:
            estimate_for_run(run, clip)  # K to estimate: from the frozen CLIP, before training
            return run_stages(run, clip, data, resume)
    finally:
        cleanup_distributed()


def run_stages(run: Run, clip, data: Loaders, resume: Resume | None) -> dict:
    """Evaluate a checkpoint, or train the stages in turn from where the run is."""
    args = run.args
    if args.stage == "eval":
        return report(evaluate_checkpoint(run, clip, data), run, f"accuracy of {args.eval_checkpoint}",
                       "eval_metrics.json")
    if resume and resume.stage == "get":
        projector = resume.checkpoint["tes_projector"]
    elif args.stage == "get":
        projector = stage1_result(run, find_tes_checkpoint(args, run.dir))
    else:
        projector = stage1(run, clip, data, resume.checkpoint if resume else None)
    if projector is None or args.stage == "tes":
        return {}
    metrics = stage2(run, clip, projector, data, resume.checkpoint if resume and resume.stage == "get" else None)
    return {} if metrics is None else report(metrics, run, "final accuracy", "final_metrics.json")


def stage1(run: Run, clip, data: Loaders, checkpoint: dict | None) -> dict | None:
    """Stage 1 (GET_SPEC §3): train the TES projector, from ``checkpoint`` if resumed; the
    projector's weights, saved as ``tes.pt`` (None if stopped)."""
    args, out = run.args, run.dir / "tes.pt"
    if out.is_file():
        get_logger().info("stage 1 already finished in this run: using %s", out)
        return stage1_result(run, out)
    seed_everything(args.seed, "tes")  # the projector's initial weights
    model = TESStage(clip, TextEmbeddingSynthesizer(clip, args.n_words), amp=args.amp)
    net = wrap_ddp(model.to(run.device), run.info)
    old_names = data.class_names[:args.num_labeled_classes]
    class_text = class_text_embeddings(clip, get_tokenizer(args.clip_model), old_names, args.prompt_template)
    logit_scale = float(clip.logit_scale.exp())

    def loss_fn(images, labels, labelled, epoch, step):
        f, t = net(images, word_drop_mask(args, run.info, epoch, step, len(images)))
        b = gather_views({"f": f, "t": t, "labels": labels, "labelled": labelled}, run.info)
        return tes_loss(b["f"], b["t"], logit_scale, b["labels"], b["labelled"], class_text)

    optim = sgd_cosine(model.trainable_parameters(), args.tes_lr, args.tes_epochs, args)
    stage = Stage("tes", model, loss_fn, *optim, args.tes_epochs, checkpoint_meta(args))
    if fit(stage, data.train, run, checkpoint) is None:
        return None
    if run.info.is_main:
        atomic_save({"meta": stage.meta, "projector": model.tes.projector.state_dict()}, out)
    get_logger().info("stage 1 done: TES saved to %s", out)
    barrier()
    return model.tes.projector.state_dict()


def word_drop_mask(args, info: DistInfo, epoch: int, step: int, rows: int) -> Tensor | None:
    """Stage 1's word dropout (--word_drop) for this process's ``rows`` of a step: drawn for
    the whole global batch from the step's own seed, so that neither the number of processes
    nor a resume changes it."""
    if not args.word_drop:
        return None
    generator = torch.Generator().manual_seed(derive_seed(args.seed, "tes", epoch, step, "word_drop"))
    keep = sample_keep_mask(rows * info.world_size, args.n_words, args.word_drop, generator)
    return local_rows(keep, info)  # on the CPU; the TES moves it


def stage1_result(run: Run, path: Path) -> dict:
    """The projector of a stage-1 checkpoint; the run folder keeps a copy for any resume."""
    tes_ckpt = load_checkpoint(path, expect=checkpoint_meta(run.args))
    get_logger().info("stage 2: TES from %s", path)
    if run.info.is_main and path.resolve() != (run.dir / "tes.pt").resolve():
        atomic_save(tes_ckpt, run.dir / "tes.pt")
    return tes_ckpt["projector"]


def stage2(run: Run, clip, projector: dict, data: Loaders, checkpoint: dict | None) -> dict | None:
    """Stage 2 (GET_SPEC §4): train the dual-branch model, from ``checkpoint`` if resumed;
    its final metrics (None if stopped)."""
    args = run.args
    # Stage 2 starts from the same random state whatever happened after stage 1 (a kill
    # before its first checkpoint, a separate --stage get run).
    seed_everything(args.seed, "get")
    meta = {**checkpoint_meta(args), **{key: getattr(args, key) for key in ARCHITECTURE_FLAGS}}
    model = build_get_model(clip, projector, meta, args.amp)
    net = wrap_ddp(torch.compile(model) if args.compile else model, run.info)
    teacher_temp = partial(teacher_temperature, warmup_temp=args.warmup_teacher_temp,
                           final_temp=args.teacher_temp, warmup_epochs=args.warmup_teacher_temp_epochs)

    def loss_fn(images, labels, labelled, epoch, step):
        b = gather_views({**net(images), "labels": labels, "labelled": labelled}, run.info)
        return get_loss(b, b["labels"], b["labelled"], teacher_temp(epoch), sup_weight=args.sup_weight,
                        memax_weight=args.memax_weight, cico_weight=args.cico_weight)

    optim = sgd_cosine(model.trainable_parameters(), args.lr, args.epochs, args)
    stage = Stage("get", model, loss_fn, *optim, args.epochs, meta,
                  extra={"tes_projector": model.tes.projector.state_dict()},
                  schedule=lambda epoch: {"teacher_temp": teacher_temp(epoch)})
    evaluate_epoch = epoch_evaluation(model, data.eval_splits, run)
    metrics = fit(stage, data.train, run, checkpoint, evaluate_epoch)
    # Resumed after the last epoch: nothing left to train, evaluate the finished model.
    return evaluate_epoch(args.epochs - 1) if metrics == {} else metrics


def evaluate_checkpoint(run: Run, clip, data: Loaders) -> dict:
    """--stage eval: the metrics of a stage-2 checkpoint, whose architecture flags it carries."""
    args = run.args
    ckpt = load_stage2_checkpoint(args.eval_checkpoint, "--eval_checkpoint", expect=checkpoint_meta(args))
    for key in ARCHITECTURE_FLAGS:
        setattr(args, key, ckpt["meta"][key])
    model = get_model_from_checkpoint(clip, ckpt, args.eval_checkpoint, args.amp)
    return evaluate_run(model, data.eval_splits, args.num_labeled_classes, run)


# Errors raised on purpose for input or state the user can fix: the message says how, so it
# is printed alone, without a traceback (log.txt has it too once the run folder exists).
USER_ERRORS = (CheckpointError, FileNotFoundError, ImageCacheError, ImageLoadError, NonFiniteLossError,
               RunLockedError)

if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
