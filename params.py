"""Every flag of train.py, its default and its check: the one place where input is validated.

    python train.py --help        # every flag, grouped, with its default

``parse_args(argv)`` parses, fills the defaults that depend on the dataset or the machine,
and refuses invalid values (exit code 2, naming the flag) before any work is done.
"""
from __future__ import annotations

import argparse
import os
import string
import sys

import torch

import config
from util.dist import launched_world_size
from vocabulary import BRANCHES, STAGE1, STAGE2, heads_of, parse_metric_key, reported_head

# Mean-entropy weight of the paper per dataset (docs/method.md, "Stage 2"); 1 elsewhere.
MEMAX_WEIGHT = {"cifar100": 4.0, "cub": 2.0}
# SimGCD's own (its run scripts), for --branches visual: the same but for Herbarium19.
SIMGCD_MEMAX_WEIGHT = {**MEMAX_WEIGHT, "herbarium_19": 2.0}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="GET: generalized category discovery with CLIP (stage 1 TES, stage 2 GET).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    switch = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default="cub", choices=config.dataset_names(),
                   help="benchmark dataset (digits: the built-in demo; folder: your own images)")
    g.add_argument("--data_root", default=None,
                   help="dataset folder; default: the GET_<NAME>_ROOT variable or ./datasets/<name>")
    g.add_argument("--old_classes", default=None,
                   help="folder dataset, train/ layout: the old (labelled) classes, a file with one "
                        "folder name per line or a comma list of folder names")
    g.add_argument("--num_classes", type=num_classes_value, default=None,
                   help="K, the number of clusters (old + new classes, at least the old ones); None: the dataset's. "
                        "'auto' estimates it first (k-means of the frozen CLIP features scored on "
                        "the labelled images, Brent's search up to --max_classes), as the folder "
                        "dataset's labelled/unlabelled layout does by default")
    g.add_argument("--max_classes", type=int, default=None,
                   help="largest K that --num_classes auto considers, more than the old classes "
                        "(None: 4 x the old classes, at least 20)")
    g.add_argument("--download", action=switch, default=False,
                   help="download CIFAR through torchvision if missing (CIFAR only)")
    g.add_argument("--prop_train_labels", type=float, default=0.5,
                   help="fraction of old-class training images that are labelled")
    g.add_argument("--normalization", default="imagenet", choices=("imagenet", "clip"),
                   help="image mean/std; the reference uses ImageNet statistics")
    g.add_argument("--num_workers", type=int, default=8, help="data-loading processes per GPU/process")
    g.add_argument("--skip_bad_images", action=switch, default=False,
                   help="replace unreadable images by another sample and count them, instead of stopping")
    g.add_argument("--image_cache", default=None, metavar="DIR",
                   help="decode and resize every image once into a memory-mapped cache in DIR, reused "
                        "by every epoch and later runs (same views, bit for bit); it takes the resized "
                        "pixels' size on disk (about 1.5 GB per CUB split), printed before it is built")

    g = p.add_argument_group("model")
    g.add_argument("--clip_model", default="ViT-B-16", help="open_clip architecture name")
    g.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag, a local checkpoint file, or 'none' (random init)")
    g.add_argument("--clip_cache_dir", default=None, help="open_clip download cache folder")
    g.add_argument("--grad_from_block", type=int, default=None,
                   help="visual transformer blocks from this index on are trained in stage 2 (default: "
                        "the last block of --clip_model, as the paper: 11 of ViT-B-16's 12, 23 of ViT-L-14's 24)")
    g.add_argument("--use_projection", action=switch, default=None,
                   help="visual branch keeps CLIP's visual projection (default: on for imagenet_1k only)")
    g.add_argument("--shared_head", action=switch, default=True,
                   help="one classification head for both branches, as the reference")
    g.add_argument("--head_hidden_dim", type=int, default=2048, help="hidden width of the head MLP")
    g.add_argument("--head_bottleneck_dim", type=int, default=256,
                   help="output width of the head MLP (the contrastive features)")

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
    g.add_argument("--class_names", default="reference", choices=("reference", "tidy"),
                   help="class-name strings put into --prompt_template. reference: the reference "
                        "code's strings byte for byte (Black_footed_Albatross, aquarium_fish, "
                        "ImageNet 'cock'); tidy: underscores as spaces and open_clip's curated "
                        "ImageNet names")
    g.add_argument("--align_weight", type=float, default=1.0,
                   help="weight of the image-text alignment term (0 switches it off: an ablation)")
    g.add_argument("--distill_ce_weight", type=float, default=1.0,
                   help="weight of the distillation cross-entropy to the old classes' text (0: off)")
    g.add_argument("--distill_mse_weight", type=float, default=1.0,
                   help="weight of the distillation squared distance to the old classes' text (0: off)")
    g.add_argument("--tes_checkpoint", default=None,
                   help="stage-1 checkpoint for --stage get (default: tes.pt of the latest run "
                        "of the same --exp_name)")

    g = p.add_argument_group("stage 2")
    g.add_argument("--branches", default="both", choices=BRANCHES,
                   help="both: GET. visual: the visual branch alone, SimGCD on the same CLIP (no stage 1, "
                        "no text branch, no CICO; SimGCD's mean-entropy weights). text: the text branch "
                        "alone on the frozen TES")
    g.add_argument("--sup_weight", type=float, default=0.35,
                   help="lambda: weight of the supervised terms (1 - lambda for the unsupervised ones)")
    g.add_argument("--memax_weight", type=float, default=None,
                   help="mean-entropy weight (default: 4 cifar100, 2 cub, 1 otherwise; with --branches "
                        "visual, SimGCD's: 2 herbarium_19 too)")
    g.add_argument("--warmup_teacher_temp", type=float, default=0.07,
                   help="teacher temperature at the first epoch")
    g.add_argument("--teacher_temp", type=float, default=0.04,
                   help="teacher temperature after the warm-up")
    g.add_argument("--warmup_teacher_temp_epochs", type=int, default=30,
                   help="epochs of the linear teacher-temperature warm-up")
    g.add_argument("--cico_weight", type=float, default=1.0,
                   help="lambda_C of the CICO loss (0: GET without CICO, an ablation)")
    g.add_argument("--eval_func", default="v2", choices=("v2", "v2b"),
                   help="Hungarian accuracy: v2 (sample-averaged) or v2b (class-balanced)")
    g.add_argument("--best_metric", default=None,
                   help="evaluation metric that selects best.pt (default: train_unlabelled/visual/all, "
                        "the accuracy the paper reports; text/all with --branches text). The paper, "
                        "as SimGCD, selects nothing: it reports the last epoch, last.pt")

    g = p.add_argument_group("runtime")
    g.add_argument("--stage", default="all", choices=(STAGE1, STAGE2, "all", "eval"),
                   help="'eval' evaluates the stage-2 checkpoint given by --eval_checkpoint")
    g.add_argument("--eval_checkpoint", default=None, help="stage-2 last.pt / best.pt for --stage eval")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    g.add_argument("--amp", action=switch, default=None,
                   help="bf16 autocast of the CLIP encoders (default: on with CUDA, off on CPU)")
    g.add_argument("--compile", action=switch, default=False, help="torch.compile the stage-2 model")
    g.add_argument("--seed", type=int, default=0, help="seed of every random generator")
    g.add_argument("--exp_root", default=None, help="output root; default GET_OUTPUT_ROOT or ./outputs")
    g.add_argument("--exp_name", default="get", help="name of the run folders (and of --resume auto)")
    g.add_argument("--resume", default=None,
                   help="'auto' (latest run of --exp_name) or the path of a last.pt / tes_last.pt")
    g.add_argument("--eval_every", type=int, default=1,
                   help="evaluate the unlabelled training images every N stage-2 epochs")
    g.add_argument("--test_every", type=int, default=0,
                   help="evaluate the test split every N stage-2 epochs too (0: at the end only)")
    g.add_argument("--eval_cache_gb", type=float, default=8.0,
                   help="memory (GiB, per split) for the frozen blocks' and the TES's outputs of "
                        "the evaluation images, computed at the first evaluation and reused (0: off)")
    g.add_argument("--log_every", type=int, default=10,
                   help="bring the loss terms to the host (TensorBoard, non-finite check, stop "
                        "requests) every N steps, not after each one (a GPU never waits)")
    g.add_argument("--progress", action=switch, default=None,
                   help="tqdm progress bars (default: only when attached to a terminal)")
    return p


def flag_names() -> list[str]:
    """The destination name of every flag."""
    return [action.dest for action in get_args_parser()._actions if action.dest != "help"]


def parse_args(argv: list[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parsed flags (of ``parser``, default train.py's) with every default resolved; exits
    with a usage error on invalid input."""
    parser = parser or get_args_parser()
    args = parser.parse_args(argv)
    fill_defaults(args)
    problem = find_problem(args)
    if problem:
        parser.error(problem)
    return args


def num_classes_value(text: str) -> int | str:
    """--num_classes: a whole number >= 1, or 'auto'."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number >= 1 nor 'auto'")
    return int(text)


def fill_defaults(args: argparse.Namespace) -> None:
    """Defaults that depend on the dataset or on the machine."""
    if args.pretrained and args.pretrained.lower() == "none":
        args.pretrained = None
    if args.memax_weight is None:
        weights = SIMGCD_MEMAX_WEIGHT if args.branches == "visual" else MEMAX_WEIGHT
        args.memax_weight = weights.get(args.dataset_name, 1.0)
    if args.best_metric is None:
        args.best_metric = f"train_unlabelled/{reported_head(args.branches)}/all"
    if args.grad_from_block is None:
        args.grad_from_block = last_block(args.clip_model)
    if args.use_projection is None:
        args.use_projection = args.dataset_name == "imagenet_1k"
    args.device = resolve_device(args.device)
    if args.amp is None:
        args.amp = args.device.startswith("cuda")
    if args.progress is None:
        args.progress = sys.stderr.isatty()


def last_block(clip_model: str) -> int | None:
    """Index of the image encoder's last block (None for an unknown or non-ViT architecture,
    which grad_from_block_problem reports)."""
    try:
        return config.vision_depth(clip_model) - 1
    except ValueError:
        return None


def resolve_device(device: str) -> str:
    """--device with 'auto' resolved: CUDA when there is a GPU, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_problem(device: str) -> str | None:
    """What is wrong with a resolved --device, if anything."""
    if not (device == "cpu" or device.startswith("cuda")):
        return "--device must be auto, cpu or cuda[:N]"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {device} asked for, but CUDA is not available; use --device cpu"
    return None


def find_problem(args: argparse.Namespace) -> str | None:
    """The first invalid flag value, as a message that names the flag; None if all are valid."""
    checks = [
        (0 < args.prop_train_labels <= 1, "--prop_train_labels must be in (0, 1]"),
        (args.old_classes is None or args.dataset_name == "folder",
         "--old_classes is for --dataset_name folder (your own images)"),
        (args.max_classes is None or args.max_classes >= 2, "--max_classes must be >= 2"),
        (args.batch_size >= 2, "--batch_size must be at least 2 (two views per sample are paired)"),
        (args.batch_size % launched_world_size() == 0,
         f"--batch_size {args.batch_size} is the global batch: it must be a multiple of the "
         f"{launched_world_size()} processes"),
        (args.epochs >= 1 and args.tes_epochs >= 1, "--epochs and --tes_epochs must be >= 1"),
        (args.n_words >= 1, "--n_words must be >= 1"),
        (0 <= args.word_drop < 1, "--word_drop must be in [0, 1)"),
        (args.lr > 0 and args.tes_lr > 0, "learning rates must be > 0"),
        (args.eval_every >= 1 and args.log_every >= 1, "--eval_every and --log_every must be >= 1"),
        (args.test_every >= 0 and args.eval_cache_gb >= 0, "--test_every and --eval_cache_gb must be >= 0"),
        (args.num_workers >= 0, "--num_workers must be >= 0"),
        (args.image_cache is None or not os.path.isfile(args.image_cache),
         f"--image_cache {args.image_cache} is a file; give it a folder"),
        (args.max_steps_per_epoch is None or args.max_steps_per_epoch >= 1,
         "--max_steps_per_epoch must be >= 1"),
        (device_problem(args.device) is None, device_problem(args.device)),
        (prompt_template_problem(args.prompt_template) is None, prompt_template_problem(args.prompt_template)),
        ((args.stage == "eval") == bool(args.eval_checkpoint),
         "--stage eval and --eval_checkpoint PATH go together"),
        (parse_metric_key(args.best_metric) is not None,
         "--best_metric must look like train_unlabelled/visual/all "
         "(split: train_unlabelled|test, head: visual|text|fused, all|old|new)"),
        ((parse_metric_key(args.best_metric) or ("", "visual"))[1] in heads_of(args.branches),
         f"--best_metric {args.best_metric}: a --branches {args.branches} model has only the "
         f"{'/'.join(heads_of(args.branches))} head"),
        (min(args.align_weight, args.distill_ce_weight, args.distill_mse_weight) >= 0
         and max(args.align_weight, args.distill_ce_weight, args.distill_mse_weight) > 0,
         "--align_weight, --distill_ce_weight and --distill_mse_weight must be >= 0, and not all 0"),
        (args.branches != "visual" or args.stage != STAGE1 and not args.tes_checkpoint,
         "--branches visual (SimGCD on CLIP) has no stage 1 and no TES: drop --stage tes and --tes_checkpoint"),
    ]
    problem = next((message for ok, message in checks if not ok), None)
    return problem or grad_from_block_problem(args)


def prompt_template_problem(template: str) -> str | None:
    """What keeps ``template.format(name)`` from putting one name into the prompt, if anything."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        template.format("name")
    except (ValueError, IndexError, KeyError):
        fields = None
    if fields != [""]:
        return (f"--prompt_template {template!r} must hold exactly one '{{}}', where the name goes, and no "
                "other braces (write {{ and }} for literal ones)")
    return None


def grad_from_block_problem(args: argparse.Namespace) -> str | None:
    try:
        depth = config.vision_depth(args.clip_model)
    except ValueError as err:
        return str(err)
    if not 0 <= args.grad_from_block <= depth:
        return (f"--grad_from_block must be in [0, {depth}] for {args.clip_model} "
                f"({depth} visual blocks); got {args.grad_from_block}")
    return None
