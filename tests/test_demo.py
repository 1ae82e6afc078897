"""The demo learns: the settings of scripts/run_demo.sh (the pretrained tiny CLIP of
weights/GET-tiny-digits.pt), shortened, must cluster the unlabelled digits clearly better than
chance in the visual AND the text branch, fuse them without doing worse than a chance-level text
branch would make it, and bring every contrastive term clearly below its chance value. The
committed CLIP must know the digits' names, and scripts/pretrain_tiny_clip.py must write the
same loadable file for the same command.
"""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

import train
from bench.demo_seeds import demo_flags
from backbone import load_clip
from config import vision_image_size
from data.get_datasets import get_datasets
from data.loaders import build_loaders
from data.task import task_from_args
from evaluation.accuracy import split_cluster_acc_v2
from params import parse_args
from util.dist import DistInfo

REPO = Path(__file__).resolve().parents[1]


def chance_accuracy(y_true: np.ndarray, trials: int = 20) -> float:
    """Mean Hungarian accuracy of uniformly random cluster ids: what a model that learnt nothing
    gets (above 1/K, because the matching picks the luckiest assignment)."""
    rng = np.random.default_rng(0)
    old = y_true < 5
    return float(np.mean([split_cluster_acc_v2(y_true, rng.integers(0, 10, len(y_true)), old)[0]
                          for _ in range(trials)]))


def supcon_chance(batch_size: int) -> float:
    """SupCon's value when z carries no information (every cosine equal): ln(M - 1) for M
    labelled rows, averaged over the batch's draw. The sampler draws a labelled sample with
    probability 1/2 (equal total weights), so M = 2k with k ~ Binomial(B, 1/2); a batch
    without labelled rows has SupCon 0."""
    return sum(math.comb(batch_size, k) / 2 ** batch_size * math.log(2 * k - 1)
               for k in range(1, batch_size + 1))


def test_short_demo_learns_in_every_branch_and_term(tmp_path):
    # 2 stage-1 and 6 stage-2 epochs instead of 5 and 40, evaluated once at the end (~40 s on
    # one core). Measured: visual All 0.85, text 0.75, fused 0.68; the heads agree on 0.51 of
    # the images as numbered, 0.77 after matching (the full demo: README).
    flags = demo_flags()
    metrics = train.main(flags + ["--tes_epochs", "2", "--epochs", "6", "--eval_every", "6",
                                  "--exp_root", str(tmp_path), "--no-progress"])
    task = task_from_args(Namespace(dataset_name="digits", data_root=None, prop_train_labels=0.5))
    unlabelled = get_datasets("digits", None, None, task)[2]
    chance = chance_accuracy(np.asarray(unlabelled.targets))
    # Chance is ~0.14 here (a constant prediction scores the largest class share, also ~0.14).
    # Twice chance is a margin no untrained or collapsed branch reaches: a text side that runs
    # but has learnt nothing (a CLIP without language, a TES that is not applied) stays near
    # chance.
    assert 0.1 < chance < 0.16
    visual, text = metrics["train_unlabelled/visual/all"], metrics["train_unlabelled/text/all"]
    assert visual >= 2 * chance, (chance, metrics)
    assert text >= 2 * chance, (chance, metrics)
    # Fusing with a chance-level text head as confident as the visual one would land about
    # halfway between the visual accuracy and chance; the learnt text head must not do worse.
    assert metrics["train_unlabelled/fused/all"] >= (visual + chance) / 2, (chance, metrics)
    # The text head groups the images as the visual head does, whatever numbers it gives the
    # groups: two unrelated clusterings agree, after matching, about as often as chance.
    assert metrics["train_unlabelled/agreement/matched"] >= 2 * chance, metrics

    (run_dir,) = (tmp_path / "digits").glob("demo-*")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Stage 1 logs how often a labelled image's pseudo text is nearest to its class's text
    # (5 old classes: chance 0.2).
    assert [r for r in records if r["stage"] == "tes"][-1]["loss"]["distill_acc"] > 0.5
    # The contrastive terms learn (a collapsed projection z sits exactly at these values):
    # InfoNCE's chance value is ln(2B - 1) = 4.14, SupCon's ln(M - 1) = 3.42 on average (B = 32).
    # Measured in the 6th epoch: InfoNCE 3.40 (visual) / 3.52 (text), SupCon 1.85 / 2.22.
    last = [r for r in records if r["stage"] == "get"][-1]["loss"]
    batch = int(flags[flags.index("--batch_size") + 1])
    for branch in ("visual", "text"):
        assert last[f"{branch}/info_nce"] < math.log(2 * batch - 1) - 0.3, last
        assert last[f"{branch}/supcon"] < supcon_chance(batch) - 0.6, last


def test_demo_seeds_draw_their_own_augmentations_and_results(tmp_path):
    # A guard over whole runs: seeds that shared their augmentation stream, or whose results did
    # not move at all, would mean a seed that is ignored somewhere.
    flags = demo_flags() + ["--exp_root", str(tmp_path), "--no-progress"]
    first_views = {}
    for seed in (0, 1, 2):
        args = parse_args(flags + ["--seed", str(seed)])
        loader = build_loaders(task_from_args(args), args, vision_image_size(args.clip_model), DistInfo()).train
        for stage, epoch in (("tes", 0), ("tes", 1), ("get", 0)):
            loader.sampler.set_epoch(epoch, stage=stage)
            first_views[seed, stage, epoch] = torch.cat(next(iter(loader))[0])
    views = list(first_views.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(views) for b in views[i + 1:])

    # Three very short runs (8 steps per stage): measured visual All 0.566 / 0.509 / 0.594.
    results = [train.main(flags + ["--tes_epochs", "1", "--epochs", "1", "--max_steps_per_epoch", "8",
                                   "--seed", str(seed), "--exp_name", f"seed{seed}"])
               for seed in (0, 1, 2)]
    visual = [r["train_unlabelled/visual/all"] for r in results]
    assert len({tuple(round(v, 6) for k, v in sorted(r.items()) if k != "reported") for r in results}) == 3, visual
    assert statistics.pstdev(visual) > 0.002, visual


def load_pretraining_script():
    """scripts/pretrain_tiny_clip.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("pretrain_tiny_clip",
                                                  REPO / "scripts" / "pretrain_tiny_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tiny_clip_reads_digits_zero_shot():
    # The demo's CLIP, loaded as the demo loads it, names scikit-learn's digits from the prompt
    # "a photo of the number {name}" far above chance (0.1), as its file says it does.
    pretrain = load_pretraining_script()
    flags = demo_flags()
    weights, name = flags[flags.index("--pretrained") + 1], flags[flags.index("--clip_model") + 1]
    clip = load_clip(name, weights)
    images, labels = pretrain.sklearn_digits(name)
    accuracy = pretrain.zero_shot_accuracy(clip, name, images, labels)
    assert accuracy >= 0.5
    meta = torch.load(weights, weights_only=True)["meta"]
    assert abs(meta["zero_shot_sklearn_digits"] - accuracy) < 0.01, meta["zero_shot_sklearn_digits"]


def test_pretraining_writes_the_same_loadable_file_twice(tmp_path):
    pretrain = load_pretraining_script()
    tiny = ["--per_class", "2", "--held_out", "1", "--steps", "2", "--batch_size", "8",
            "--warmup", "1"]
    first = pretrain.main(tiny + ["--out", str(tmp_path / "a.pt")]).read_bytes()
    out = pretrain.main(tiny + ["--out", str(tmp_path / "a.pt")])
    assert out.read_bytes() == first
    state = torch.load(out, weights_only=True)["state_dict"]
    assert state["token_embedding.weight"].dtype == torch.float16
    load_clip("GET-tiny-digits", str(out))  # the demo's route reads it


def test_pretraining_streams_never_repeat_each_other():
    # The held-out digits of one --seed used to be the training digits of the next (seed + 1),
    # and the batches drew the numbers of the initial weights (both seeded with --seed).
    pretrain = load_pretraining_script()
    fonts = pretrain.find_fonts()

    def digits(seed: int, purpose: str) -> torch.Tensor:
        return pretrain.render_pool(1, fonts, 0.4, pretrain.random_streams(seed)[purpose])[0]

    held_out_0, training_1, training_0 = digits(0, "held-out digits"), digits(1, "training digits"), digits(0, "training digits")
    assert not torch.equal(held_out_0, training_1) and not torch.equal(training_0, held_out_0)
    assert torch.equal(digits(0, "training digits"), training_0)
    streams = pretrain.random_streams(0)
    torch.manual_seed(streams["initial weights"])
    init_words = torch.randint(0, 2 ** 32, (20,), dtype=torch.int64)
    batch_words = torch.randint(0, 2 ** 32, (20,), dtype=torch.int64, generator=streams["batches"])
    assert not set(init_words.tolist()) & set(batch_words.tolist())
