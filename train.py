"""Train GET on one dataset: stage 1 (the Text Embedding Synthesizer), then stage 2 (the
dual-branch GCD model), with evaluation, TensorBoard, checkpoints and resume.

    python train.py --dataset_name cub                  # both stages, paper settings
    python train.py --dataset_name cub --stage get --tes_checkpoint outputs/cub/.../tes.pt
    python train.py --dataset_name cub --resume auto    # pick up the latest run of --exp_name
    python train.py --dataset_name cub --branches visual  # the SimGCD baseline on the same CLIP
    torchrun --nproc_per_node 4 train.py --dataset_name imagenet_1k

How it reads: ``main`` checks every input and opens the run; ``stage1`` and ``stage2`` each
build a ``Stage`` (the model, the step of methods/tes.py or methods/get.py, the optimiser) and
hand it to ``fit``, the epoch loop: ``engine.train_one_epoch``, the evaluation (evaluation/),
the epoch's log (runs/results.py) and the checkpoints (runs/checkpoints.py). The flags are in
params.py, the task (dataset, split, K, class names) in data/task.py, the models in model.py.
Everything a run writes goes to ``<exp_root>/<dataset>/<exp_name>-<timestamp>/``.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from backbone import build_clip, class_text_embeddings, get_tokenizer
from config import vision_image_size
from data.loaders import Loaders, build_loaders
from data.task import Task, task_from_args
from engine import Position, Stage, format_parameter_summary, sgd_cosine, train_one_epoch
from errors import USER_ERRORS
from evaluation.cache import EvalCache
from evaluation.evaluate import Evaluator
from evaluation.k_estimate import estimate_k, format_estimate
from methods.get import GETStep
from methods.simgcd import teacher_temperature
from methods.tes import TES_LOSS_WEIGHTS, TESStep
from model import GETConfig, TESStage, TextEmbeddingSynthesizer, build_get_model
from params import flag_names, parse_args
from runs.checkpoints import (BEST_FILE, LAST_FILE, TES_FILE, load_stage2_checkpoint, load_tes, model_from_checkpoint,
                              restore_state, save_state, save_tes, task_meta, tes_projector)
from runs.resume import Resume, find_resume
from runs.results import log_epoch, record_confusion, record_results, tensorboard_layout
from runs.run import (CLUSTER_SIZES, CONFIG, EVAL_METRICS, FINAL_METRICS, K_ESTIMATE, SKIPPED_IMAGES, Run,
                      find_tes_checkpoint, new_run_dir, open_run)
from util.dist import barrier, cleanup_distributed, init_distributed, wrap_ddp
from util.io import save_json
from util.logging_utils import get_logger, setup_logging
from util.rng import seed_everything
from vocabulary import STAGE1, STAGE2


def main(argv: list[str] | None = None) -> dict:
    """Run the stages that ``--stage`` asks for; returns the final stage-2 metrics ({} if none)."""
    args = parse_args(argv)
    info = init_distributed(args.device)
    setup_logging(None, info.is_main)
    try:
        # Every input is checked, the dataset and the checkpoints first, before the run folder
        # is made or touched.
        inputs = read_inputs(task_from_args(args), args)
        task, resume = inputs.task, inputs.resume
        run_dir = resume.run_dir if resume else new_run_dir(args, info)
        skip_log = run_dir / SKIPPED_IMAGES if args.skip_bad_images else None
        data = build_loaders(task, args, vision_image_size(args.clip_model), info, skip_log)
        clip = build_clip(args, info.device(args.device))
        with open_run(args, info, run_dir, resume, task.record()) as run:
            task = estimate_k_for_run(task, run, clip)  # K to estimate: from the frozen CLIP, before training
            return run_stages(run, task, clip, data, inputs)
    finally:
        cleanup_distributed()


@dataclass
class Inputs:
    """The checkpoints a run continues or uses, each read once and checked before anything is
    written, and the task with their K where K was to be estimated."""
    task: Task
    resume: Resume | None
    evaluated: dict | None       # --stage eval: the stage-2 checkpoint of --eval_checkpoint
    tes_path: Path | None        # where this run does not train stage 1, the stage-1
    tes: dict | None             # checkpoint that stage 2 starts from: its path, its content


def read_inputs(task: Task, args) -> Inputs:
    """Read and check every checkpoint that the flags name or that is found for them: --resume,
    --eval_checkpoint, the stage-1 checkpoint of --stage get or of a resumed run that finished
    stage 1. Each must agree with the task; the first one's K is the run's if K is to be estimated."""
    resume = find_resume(args, expected_meta(task, args), flag_names())
    if resume:
        task = checkpoint_k(task, resume.checkpoint, resume.path)
    evaluated = None
    if args.stage == "eval":
        evaluated = load_stage2_checkpoint(args.eval_checkpoint, "--eval_checkpoint", expected_meta(task, args))
        task = checkpoint_k(task, evaluated, args.eval_checkpoint)
    tes_path, tes = stage1_checkpoint_path(args, resume), None
    if tes_path:
        tes = load_tes(tes_path, expected_meta(task, args))
        task = checkpoint_k(task, tes, tes_path)
    return Inputs(task, resume, evaluated, tes_path, tes)


def expected_meta(task: Task, args) -> dict:
    """What a checkpoint must agree on with this run; K only once it is known (a checkpoint
    gives it where it is to be estimated)."""
    meta = task_meta(task, args.clip_model, args.n_words)
    if task.k_pending:
        del meta["num_classes"]
    return meta


def checkpoint_k(task: Task, checkpoint: dict, path: str | Path) -> Task:
    """Where K is to be estimated but the run continues or uses a checkpoint, its K: the same K
    as before, and no second search."""
    num_classes = checkpoint.get("meta", {}).get("num_classes")
    if not task.k_pending or num_classes is None:
        return task
    get_logger().info("K = %d, as in %s (estimated there, not again)", num_classes, path)
    return task.with_k(int(num_classes), "checkpoint")


def stage1_checkpoint_path(args, resume: Resume | None) -> Path | None:
    """The stage-1 checkpoint of a run that does not train stage 1: --stage get's (the flag's,
    or the newest run's tes.pt), or the tes.pt of a resumed run that finished stage 1. None
    otherwise (a stage-2 state carries its own TES)."""
    if args.stage == "eval" or args.branches == "visual" or resume and resume.stage == STAGE2:
        return None
    if args.stage == STAGE2:
        return find_tes_checkpoint(args, resume.run_dir if resume else None)
    if resume and (resume.run_dir / TES_FILE).is_file():
        return resume.run_dir / TES_FILE
    return None


def run_stages(run: Run, task: Task, clip, data: Loaders, inputs: Inputs) -> dict:
    """Evaluate a checkpoint, or train the stages in turn from where the run is."""
    args, resume = run.args, inputs.resume
    if args.stage == "eval":
        return finish(run, task, evaluate_checkpoint(run, task, clip, data, inputs.evaluated),
                      f"accuracy of {args.eval_checkpoint}", EVAL_METRICS)
    projector = None  # --branches visual, SimGCD on CLIP: no stage 1, no TES
    if args.branches != "visual":
        projector = trained_tes(run, task, clip, data, inputs)
        if projector is None or args.stage == STAGE1:
            return {}
    evaluated = stage2(run, task, clip, projector, data,
                       resume.checkpoint if resume and resume.stage == STAGE2 else None)
    return finish(run, task, evaluated, "final accuracy", FINAL_METRICS)


def trained_tes(run: Run, task: Task, clip, data: Loaders, inputs: Inputs) -> dict | None:
    """The TES projector that stage 2 trains with: the resumed stage-2 state's, the stage-1
    checkpoint's that the run uses, or stage 1 trained now (None if stopped)."""
    resume = inputs.resume
    if resume and resume.stage == STAGE2:
        return tes_projector(resume.checkpoint)
    if inputs.tes is not None:
        return stage1_result(run, task, inputs.tes_path, inputs.tes)
    return stage1(run, task, clip, data, resume.checkpoint if resume else None)


def finish(run: Run, task: Task, evaluated: tuple[dict, dict] | None, title: str, file_name: str) -> dict:
    """The final evaluation, (metrics, the predictions they come from), to the log and the run
    folder: the accuracy table and the confusion matrices. Its metrics with the reported
    accuracy, as saved ({} if stopped)."""
    if evaluated is None:
        return {}
    metrics, predictions = evaluated
    saved = record_results(metrics, task.ground_truth, run, title, file_name)
    record_confusion(predictions, task, run)
    return saved


def stage1(run: Run, task: Task, clip, data: Loaders, checkpoint: dict | None) -> dict | None:
    """Stage 1 (docs/method.md): train the TES projector, from ``checkpoint`` if resumed; the
    projector's weights, saved as tes.pt (None if stopped)."""
    args, out = run.args, run.dir / TES_FILE
    seed_everything(args.seed, STAGE1)  # the projector's initial weights
    model = TESStage(clip, TextEmbeddingSynthesizer(clip, args.n_words), amp=args.amp).to(run.device)
    old_names = task.class_names[:task.num_labeled_classes]
    class_text = class_text_embeddings(clip, get_tokenizer(args.clip_model), old_names, args.prompt_template)
    step = TESStep(wrap_ddp(model, run.info), class_text, float(clip.logit_scale.exp()), run.info,
                   args.seed, args.word_drop, args.n_words, {name: getattr(args, name) for name in TES_LOSS_WEIGHTS})
    optimizer = sgd_cosine(model.trainable_parameters(), args.tes_lr, args.tes_epochs, args.momentum, args.weight_decay)
    stage = Stage(STAGE1, model, step, *optimizer, args.tes_epochs, task_meta(task, args.clip_model, args.n_words),
                  run.dir / LAST_FILE[STAGE1])
    if fit(stage, data.train, run, checkpoint).stopped:
        return None
    if run.info.is_main:
        save_tes(stage.meta, model.tes.projector.state_dict(), out)
    get_logger().info("stage 1 done: TES saved to %s", out)
    barrier()
    return model.tes.projector.state_dict()


def stage1_result(run: Run, task: Task, path: Path, checkpoint: dict) -> dict:
    """The projector of a stage-1 checkpoint (read from ``path`` by ``read_inputs``); the run
    folder keeps a copy for any resume."""
    projector = tes_projector(checkpoint)
    if path.resolve() == (run.dir / TES_FILE).resolve():
        get_logger().info("stage 1 already finished in this run: using %s", path)
        return projector
    get_logger().info("stage 2: TES from %s", path)
    if run.info.is_main:
        save_tes(task_meta(task, run.args.clip_model, run.args.n_words), projector, run.dir / TES_FILE)
    return projector


def stage2(run: Run, task: Task, clip, projector: dict, data: Loaders,
           checkpoint: dict | None) -> tuple[dict, dict] | None:
    """Stage 2 (docs/method.md): train the dual-branch model, from ``checkpoint`` if resumed;
    its final metrics and the predictions they come from (None if stopped)."""
    args = run.args
    # Stage 2 starts from the same random state whatever happened after stage 1 (a kill
    # before its first checkpoint, a separate --stage get run).
    seed_everything(args.seed, STAGE2)
    config = GETConfig.from_flags(args, task.num_classes)
    model = build_get_model(clip, projector, config, args.amp)
    net = wrap_ddp(torch.compile(model) if args.compile else model, run.info)
    teacher_temp = partial(teacher_temperature, warmup_temp=args.warmup_teacher_temp,
                           final_temp=args.teacher_temp, warmup_epochs=args.warmup_teacher_temp_epochs)
    step = GETStep.from_flags(net, run.info, teacher_temp, args)
    optimizer = sgd_cosine(model.trainable_parameters(), args.lr, args.epochs, args.momentum, args.weight_decay)
    meta = {**task_meta(task, args.clip_model, args.n_words), **config.meta()}
    stage = Stage(STAGE2, model, step, *optimizer, args.epochs, meta, run.dir / LAST_FILE[STAGE2],
                  schedule=lambda epoch: {"teacher_temp": teacher_temp(epoch)})
    evaluate_epoch, evaluator = stage2_evaluation(model, data, task, run)
    tensorboard_layout(run, model.branches)
    outcome = fit(stage, data.train, run, checkpoint, evaluate_epoch, task.ground_truth)
    if outcome.stopped:
        return None
    # Resumed after the last epoch: nothing left to train, evaluate the finished model.
    metrics = outcome.metrics or evaluate_epoch(args.epochs - 1)
    return None if metrics is None else (metrics, evaluator.predictions)


@dataclass
class Outcome:
    stopped: bool   # on request: the state is saved, resume with --resume auto
    metrics: dict   # the last epoch's evaluation ({} when no epoch was left to train)


def fit(stage: Stage, loader: DataLoader, run: Run, checkpoint: dict | None,
        evaluate_epoch: Callable[[int], dict | None] | None = None, ground_truth: bool = True) -> Outcome:
    """Train ``stage`` from ``checkpoint`` (or the start); after each epoch: evaluate (every
    --eval_every epochs and the last), log, checkpoint (``ground_truth``: whether the
    evaluation has accuracies to select best.pt by)."""
    log, loop = get_logger(), run.loop()
    position = restore_state(stage, checkpoint) if checkpoint else Position()
    log.info("parameters:\n%s", format_parameter_summary(stage.model.parameter_summary()))
    metrics = {}
    while position.epoch < stage.epochs:
        start = time.time()
        due = (position.epoch + 1) % run.args.eval_every == 0 or position.epoch + 1 == stage.epochs
        finished = train_one_epoch(stage, loader, position, loop)
        metrics = evaluate_epoch(position.epoch) if finished and evaluate_epoch and due else {}
        if not finished or metrics is None:  # a stop request, during training or evaluation
            if run.info.is_main:
                save_state(stage, position, run.args, stage.last_checkpoint)
            log.warning("stopped on request; state saved to %s (resume with --resume auto)", stage.last_checkpoint)
            return Outcome(stopped=True, metrics={})
        lr = stage.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # resumed at an epoch's end, no step ran here: the schedule is right
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            stage.scheduler.step()
        log_epoch(stage, position, {"lr": lr, "seconds": round(time.time() - start, 3), "eval": metrics}, run)
        position.next_epoch()
        save_checkpoints(stage, position, metrics, run, ground_truth)
    return Outcome(stopped=False, metrics=metrics)


def save_checkpoints(stage: Stage, position: Position, metrics: dict, run: Run, ground_truth: bool) -> None:
    """The stage's full state after an epoch; best.pt too when ``--best_metric`` improved."""
    # Only evaluated epochs compete (stage 1 has none); without ground truth (folder dataset,
    # labelled/unlabelled layout) best.pt is the last evaluated epoch.
    value = None if not metrics else metrics.get(run.args.best_metric) if ground_truth else position.epoch
    improved = value is not None and value > position.best
    if improved:
        position.best = value
    if run.info.is_main:
        if improved:
            save_state(stage, position, run.args, run.dir / BEST_FILE)
        save_state(stage, position, run.args, stage.last_checkpoint)
    barrier()


def stage2_evaluation(model, data: Loaders, task: Task, run: Run) -> tuple[Callable[[int], dict | None], Evaluator]:
    """Stage 2's evaluation after an epoch: the unlabelled training images, and the test split
    at the end (or every --test_every epochs, or always when --best_metric reads it). A split
    evaluated more than once keeps its frozen part cached (--eval_cache_gb each). With the
    evaluator, which keeps the last evaluation's predictions."""
    args, budget = run.args, int(run.args.eval_cache_gb * 2**30)
    test_always = args.best_metric.startswith("test/")
    repeated = ["train_unlabelled"] + (["test"] if args.test_every or test_always else [])
    caches = {split: EvalCache(split, budget) for split in repeated} if budget else {}
    evaluator = run_evaluator(task, run, caches)

    def evaluate_epoch(epoch: int) -> dict | None:
        test_due = (epoch + 1 == args.epochs or test_always
                    or bool(args.test_every) and (epoch + 1) % args.test_every == 0)
        return evaluator(model, {split: loader for split, loader in data.eval_splits.items()
                                 if split != "test" or test_due})

    return evaluate_epoch, evaluator


def run_evaluator(task: Task, run: Run, caches: dict[str, EvalCache] | None = None) -> Evaluator:
    return Evaluator(task, run.device, run.info, run.args.eval_func, run.args.progress and run.info.is_main,
                     stop=run.stop_requested, sizes_file=run.dir / CLUSTER_SIZES, caches=caches)


def evaluate_checkpoint(run: Run, task: Task, clip, data: Loaders, checkpoint: dict) -> tuple[dict, dict] | None:
    """--stage eval: the metrics of a stage-2 checkpoint (read by ``read_inputs``), rebuilt from
    the architecture it records, and the predictions they come from (None if stopped)."""
    model = model_from_checkpoint(clip, checkpoint, run.args.eval_checkpoint, run.args.amp)
    evaluator = run_evaluator(task, run)
    metrics = evaluator(model, data.eval_splits)
    return None if metrics is None else (metrics, evaluator.predictions)


def estimate_k_for_run(task: Task, run: Run, clip) -> Task:
    """Where K is to be estimated, estimate it before anything trains, and keep the record:
    k_estimate.json, TensorBoard and config.json. The task with that K."""
    if not task.k_pending:
        return task
    skip_log = run.dir / SKIPPED_IMAGES if run.args.skip_bad_images else None
    estimate = estimate_k(clip, task, run.args, run.device, run.info, skip_log)
    task = task.with_k(estimate.k, "estimate")
    get_logger().info("%s\n    (the accuracy-vs-k curve: %s and TensorBoard k_estimate/labelled_acc)",
                      format_estimate(estimate, task.num_labeled_classes), run.dir / K_ESTIMATE)
    if run.info.is_main:
        save_json(estimate.record(), run.dir / K_ESTIMATE)
        saved = json.loads((run.dir / CONFIG).read_text())
        save_json({**saved, "estimated_num_classes": estimate.k, "num_unlabeled_classes": task.num_unlabeled_classes},
                  run.dir / CONFIG)
        for k in sorted(estimate.curve):
            run.logger.log_scalars({"k_estimate/labelled_acc": estimate.curve[k]}, k)
        run.logger.log_scalars({"k_estimate/k": estimate.k}, 0)
    return task


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
