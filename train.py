"""Train GET on one dataset: stage 1 (the Text Embedding Synthesizer), then stage 2 (the
dual-branch GCD model), with evaluation, TensorBoard, checkpoints and resume.

    python train.py --dataset_name cub                  # both stages, paper settings
    python train.py --dataset_name cub --stage get --tes_checkpoint outputs/cub/.../tes.pt
    python train.py --dataset_name cub --resume auto    # pick up the latest run of --exp_name
    torchrun --nproc_per_node 4 train.py --dataset_name imagenet_1k

Flags: params.py. One epoch, evaluation, checkpoints: engine.py. Models: model.py. Losses:
methods/. Everything a run writes goes to ``<exp_root>/<dataset>/<exp_name>-<timestamp>/``.
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from data.loaders import Loaders, build_loaders
from engine import (Position, Stage, checkpoint_meta, evaluate_splits, log_epoch, report,
                    save_checkpoints, sgd_cosine, train_one_epoch)
from methods.get import get_loss
from methods.simgcd import teacher_temperature
from methods.tes import tes_loss
from model import (GETModel, HeadConfig, TESStage, TextEmbeddingSynthesizer, class_text_embeddings,
                   format_parameter_summary, get_tokenizer, load_clip, vision_image_size)
from params import ARCHITECTURE_FLAGS, parse_args
from util.checkpoint import CheckpointError, atomic_save, load_checkpoint, seed_everything
from util.dist import barrier, cleanup_distributed, gather_views, init_distributed, wrap_ddp
from util.logging_utils import environment_info, get_logger, save_json
from util.runs import Run, find_tes_checkpoint, start_run


def main(argv: list[str] | None = None) -> dict:
    """Run the stages that ``--stage`` asks for; returns the final stage-2 metrics ({} if none)."""
    args = parse_args(argv)
    info = init_distributed(args.device)
    args.device = info.device(args.device)
    try:
        with start_run(args, info) as run:
            return run_stages(run)
    finally:
        cleanup_distributed()


def run_stages(run: Run) -> dict:
    """Build the data and CLIP, then evaluate a checkpoint or train the stages in turn."""
    args = run.args
    # The data first: a missing dataset is reported before minutes of CLIP loading.
    data = build_loaders(args, vision_image_size(args.clip_model), run.info, run.dir)
    clip = build_clip(run)
    if args.stage == "eval":
        return report(evaluate_checkpoint(run, clip, data), run, f"accuracy of {args.eval_checkpoint}",
                      "eval_metrics.json")
    tes_path = find_tes_checkpoint(args, run.dir) if args.stage == "get" else stage1(run, clip, data)
    if tes_path is None or args.stage == "tes":
        return {}
    metrics = stage2(run, clip, tes_path, data)
    return {} if metrics is None else report(metrics, run, "final accuracy", "final_metrics.json")


def build_clip(run: Run) -> torch.nn.Module:
    """The frozen CLIP; records the run's set-up (config.json, environment.json) and seeds."""
    args = run.args
    # Seeding before CLIP is built makes a randomly initialised CLIP identical in every process
    # and in a resumed run; pretrained weights are loaded, not drawn.
    seed_everything(args.seed)
    clip = load_clip(args.clip_model, args.pretrained, device=args.device, cache_dir=args.clip_cache_dir)
    if run.info.is_main:
        save_json(vars(args), run.dir / "config.json")
        save_json(environment_info(Path(__file__).resolve().parent), run.dir / "environment.json")
    seed_everything(args.seed)
    return clip


def stage1(run: Run, clip, data: Loaders) -> Path | None:
    """Stage 1 (GET_SPEC §3): train the TES projector; the path of ``tes.pt`` (None if stopped)."""
    args, out = run.args, run.dir / "tes.pt"
    if out.is_file():
        get_logger().info("stage 1 already finished in this run: using %s", out)
        return out
    model = TESStage(clip, TextEmbeddingSynthesizer(clip, args.n_words, args.word_drop), amp=args.amp)
    net = wrap_ddp(model.to(run.device), run.info)
    old_names = data.class_names[:args.num_labeled_classes]
    class_text = class_text_embeddings(clip, get_tokenizer(args.clip_model), old_names, args.prompt_template)
    logit_scale = float(clip.logit_scale.exp())

    def loss_fn(images, labels, labelled, epoch):
        f, t = net(images)
        b = gather_views({"f": f, "t": t, "labels": labels, "labelled": labelled}, run.info)
        return tes_loss(b["f"], b["t"], logit_scale, b["labels"], b["labelled"], class_text)

    optim = sgd_cosine(model.trainable_parameters(), args.tes_lr, args.tes_epochs, args)
    stage = Stage("tes", model, loss_fn, *optim, args.tes_epochs, checkpoint_meta(args))
    if fit(stage, data, run) is None:
        return None
    if run.info.is_main:
        atomic_save({"meta": stage.meta, "projector": model.tes.projector.state_dict()}, out)
    get_logger().info("stage 1 done: TES saved to %s", out)
    barrier()
    return out


def stage2(run: Run, clip, tes_path: Path, data: Loaders) -> dict | None:
    """Stage 2 (GET_SPEC §4): train the dual-branch model; its final metrics (None if stopped)."""
    args = run.args
    tes_ckpt = load_checkpoint(tes_path, expect=checkpoint_meta(args))
    get_logger().info("stage 2: TES from %s", tes_path)
    if run.info.is_main and tes_path.resolve() != (run.dir / "tes.pt").resolve():
        atomic_save(tes_ckpt, run.dir / "tes.pt")  # the run keeps its TES, for any resume
    model = build_get_model(args, clip, tes_ckpt["projector"])
    net = wrap_ddp(torch.compile(model) if args.compile else model, run.info)

    teacher_temp = partial(teacher_temperature, warmup_temp=args.warmup_teacher_temp,
                           final_temp=args.teacher_temp, warmup_epochs=args.warmup_teacher_temp_epochs)

    def loss_fn(images, labels, labelled, epoch):
        b = gather_views({**net(images), "labels": labels, "labelled": labelled}, run.info)
        return get_loss(b, b["labels"], b["labelled"], teacher_temp(epoch), sup_weight=args.sup_weight,
                        memax_weight=args.memax_weight, cico_weight=args.cico_weight)

    meta = {**checkpoint_meta(args), **{key: getattr(args, key) for key in ARCHITECTURE_FLAGS}}
    optim = sgd_cosine(model.trainable_parameters(), args.lr, args.epochs, args)
    stage = Stage("get", model, loss_fn, *optim, args.epochs, meta,
                  extra={"tes_projector": model.tes.projector.state_dict()},
                  schedule=lambda epoch: {"teacher_temp": teacher_temp(epoch)})
    evaluate_model = partial(evaluate_splits, model, data.eval_splits, args.num_labeled_classes, run)
    metrics = fit(stage, data, run, evaluate_model)
    # Resumed after the last epoch: nothing left to train, evaluate the finished model.
    return evaluate_model() if metrics == {} else metrics


def fit(stage: Stage, data: Loaders, run: Run, evaluate_model: Callable[[], dict] | None = None):
    """Resume ``stage``, then for each epoch: train, evaluate (every --eval_every epochs and
    the last), log, checkpoint. Returns the last evaluation ({} when no epoch was left to
    train), None when stopped on request."""
    log, last = get_logger(), run.dir / stage.last_name
    position = stage.restore(last) if last.is_file() else Position()
    if position.epoch or position.step_in_epoch:
        log.info("stage %s: resuming from %s at epoch %d, step %d", stage.name, last,
                 position.epoch, position.step_in_epoch)
    log.info("parameters:\n%s", format_parameter_summary(stage.model.parameter_summary()))
    metrics = {}
    while position.epoch < stage.epochs:
        start = time.time()
        if not train_one_epoch(stage, data.train, position, run):
            if run.info.is_main:
                stage.save(last, position, run.args)
            log.warning("stopped on request; state saved to %s (resume with --resume auto)", last)
            return None
        lr = stage.optimizer.param_groups[0]["lr"]
        stage.scheduler.step()
        due = (position.epoch + 1) % run.args.eval_every == 0 or position.epoch + 1 == stage.epochs
        metrics = evaluate_model() if evaluate_model and due else {}
        log_epoch(stage, position, {"lr": lr, "seconds": round(time.time() - start, 3), "eval": metrics}, run)
        position.next_epoch()
        save_checkpoints(stage, position, metrics, run)
    return metrics


def build_get_model(args, clip, tes_projector: dict) -> GETModel:
    tes = TextEmbeddingSynthesizer(clip, n_words=args.n_words)
    tes.projector.load_state_dict(tes_projector)
    head = HeadConfig(args.shared_head, args.head_hidden_dim, args.head_bottleneck_dim)
    num_classes = args.num_labeled_classes + args.num_unlabeled_classes
    return GETModel(clip, tes, num_classes, args.grad_from_block, args.use_projection, head,
                    amp=args.amp).to(torch.device(args.device))


def evaluate_checkpoint(run: Run, clip, data: Loaders) -> dict:
    """--stage eval: the metrics of a stage-2 checkpoint, whose architecture flags it carries."""
    args = run.args
    ckpt = load_checkpoint(args.eval_checkpoint, expect=checkpoint_meta(args))
    if ckpt.get("stage") != "get":
        raise CheckpointError(f"--eval_checkpoint {args.eval_checkpoint} is not a stage-2 "
                              "checkpoint (last.pt or best.pt of a stage-2 run)")
    for key in ARCHITECTURE_FLAGS:
        setattr(args, key, ckpt["meta"][key])
    model = build_get_model(args, clip, ckpt["tes_projector"])
    model.load_trainable_state_dict(ckpt["model"])
    return evaluate_splits(model, data.eval_splits, args.num_labeled_classes, run)


if __name__ == "__main__":
    main()
