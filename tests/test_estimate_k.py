"""Estimating K (evaluation/k_estimate.py, estimate_k.py, train.py --num_classes auto): the search on
synthetic features whose number of clusters is known, and the estimate end to end."""
from __future__ import annotations

from argparse import Namespace
from functools import partial

import json

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

import data_fixtures as F
import estimate_k
import train
from errors import ImageLoadError
from evaluation import k_estimate as E
from evaluation.accuracy import split_cluster_acc_v2
from util.rng import derive_seed
from tests.helpers import run_dirs, scalar_tags

N_OLD, N_CLASSES, PER_CLASS, DIM = 4, 12, 40, 16


def synthetic_features(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """12 well-separated Gaussian clusters in 16-d, the first 4 old, half of each old class
    labelled: (features [480, 16], labels [480], labelled [480]).

    GCD's score is the accuracy on the labelled images, which shows only what k-means does to
    the OLD classes; merging or splitting new classes leaves it unchanged. So here the old
    classes are the ones k-means touches first on either side of K: the closest to each
    other (k < 12 merges two of them) and the widest (k > 12 splits one of them), while every
    cluster stays clearly apart (k = 12 recovers all of them). That is the case in which the
    method finds K exactly, and what is tested is that the search finds it, and fast.
    """
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(N_CLASSES, DIM))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    centres = np.concatenate([directions[:N_OLD] * 6.0, directions[N_OLD:] * 16.0])
    spread = np.where(np.arange(N_CLASSES) < N_OLD, 1.0, 0.4)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    features = centres[labels] + spread[labels, None] * rng.normal(size=(len(labels), DIM))
    labelled = (labels < N_OLD) & (np.arange(len(labels)) % PER_CLASS < PER_CLASS // 2)
    return features.astype(np.float32), labels, labelled


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_estimate_is_exact_and_evaluates_few_k(seed):
    features, labels, labelled = synthetic_features(seed)
    evaluated = []

    def score(k: int) -> float:
        evaluated.append(k)
        return E.labelled_accuracy(features, labels, labelled, k, seed=0)

    k, curve = E.brent_search(score, N_OLD, 40)
    assert k == N_CLASSES and curve[N_CLASSES] == 1.0
    assert len(evaluated) == len(set(evaluated)) == len(curve)  # no k clustered twice
    assert len(evaluated) <= (40 - N_OLD + 1) // 4, evaluated  # a full sweep: 37 values


def scikit_learn_accuracy(features, labels, labelled, k, seed=0):
    """E.labelled_accuracy as it was before the torch k-means: scikit-learn's KMeans, the same
    restarts and seed."""
    kmeans = KMeans(n_clusters=k, n_init=E.KMEANS_INITS, random_state=derive_seed(seed, "k-means", k))
    clusters = kmeans.fit_predict(features)
    return split_cluster_acc_v2(labels[labelled], clusters[labelled], np.ones(int(labelled.sum()), bool))[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_torch_k_means_chooses_the_k_of_scikit_learns(seed):
    features, labels, labelled = synthetic_features(seed)
    k, curve = E.brent_search(partial(E.labelled_accuracy, torch.from_numpy(features), labels, labelled), N_OLD, 40)
    k_sklearn, curve_sklearn = E.brent_search(partial(scikit_learn_accuracy, features, labels, labelled), N_OLD, 40)
    assert k == k_sklearn == N_CLASSES and curve[k] == curve_sklearn[k] == 1.0
    # Away from K each accuracy is that of one local optimum of k-means, which moves with the
    # seed: by up to 0.25 at one k for either implementation (0.03-0.05 on average over k = 4..40,
    # measured). The two curves differ by 0.01-0.04 on average over the k evaluated (10 data
    # sets measured); 0.06 is the bound.
    both = sorted(set(curve) & set(curve_sklearn))
    assert len(both) >= 5 and np.mean([abs(curve[k] - curve_sklearn[k]) for k in both]) <= 0.06
    # An array runs on the CPU as the tensor does: the same clusters, the same accuracy.
    first = next(iter(curve))
    assert E.labelled_accuracy(features, labels, labelled, first) == curve[first]


def test_brent_search_finds_the_peak_of_a_long_interval_in_few_steps():
    calls = []

    def score(k: int) -> float:
        calls.append(k)
        return -abs(k - 137) / 200

    k, curve = E.brent_search(score, 50, 1000)
    assert k == 137 and len(calls) == len(set(calls)) <= 25
    assert E.brent_search(lambda k: float(k), 5, 9)[0] == 9  # the interval's ends are reachable
    assert E.brent_search(lambda k: -float(k), 5, 9)[0] == 5


def test_search_bounds():
    assert E.search_bounds(Namespace(num_labeled_classes=3), None, 1000) == (3, 20)
    task = Namespace(num_labeled_classes=100)
    assert E.search_bounds(task, 250, 1000) == (100, 250) and E.search_bounds(task, 250, 180) == (100, 180)
    with pytest.raises(ValueError, match="--max_classes 100 leaves no K to search above the 100 old"):
        E.search_bounds(task, 100, 1000)
    with pytest.raises(ValueError, match="the 90 training images leave no K to search above the 100 old"):
        E.search_bounds(task, None, 90)


def tiny_argv(out, root, *extra):
    return ["--dataset_name", "folder", "--data_root", str(root), "--clip_model", "GET-tiny",
            "--pretrained", "none", "--device", "cpu", "--num_workers", "0", "--batch_size", "8",
            "--no-progress", "--exp_root", str(out), *extra]


def test_standalone_estimate_matches_the_training_run(tmp_path):
    root = F.write_folder(tmp_path / "data", "train")
    out_file = tmp_path / "k.json"
    estimate = estimate_k.main(tiny_argv(tmp_path, root, "--old_classes", "ant,bee,cat", "--max_classes", "12",
                                         "--out", str(out_file)))
    record = json.loads(out_file.read_text())
    assert record["k"] == estimate.k and (record["k_min"], record["k_max"]) == (3, 12)
    assert record["n_images"] == 24 and record["n_labelled"] == 6
    assert [p["k"] for p in record["curve"]] == sorted(estimate.curve) and 3 <= estimate.k <= 12

    # train.py --num_classes auto: the same estimate, before stage 1, recorded in the run folder,
    # TensorBoard and config.json, and used as K.
    train.main(tiny_argv(tmp_path / "out", root, "--old_classes", "ant,bee,cat", "--max_classes", "12",
                         "--num_classes", "auto", "--grad_from_block", "2", "--tes_epochs", "1",
                         "--epochs", "1", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32"))
    (run_dir,) = run_dirs(tmp_path / "out", "get", "folder")
    saved = json.loads((run_dir / "k_estimate.json").read_text())
    assert saved["k"] == estimate.k and saved["curve"] == record["curve"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_classes"] == "auto" and config["estimated_num_classes"] == estimate.k
    assert config["num_labeled_classes"] + config["num_unlabeled_classes"] == estimate.k
    assert {"k_estimate/labelled_acc", "k_estimate/k"} <= scalar_tags(run_dir)
    assert torch.load(run_dir / "last.pt", weights_only=True)["meta"]["num_classes"] == estimate.k
    assert torch.load(run_dir / "tes.pt", weights_only=True)["meta"]["num_classes"] == estimate.k
    log = (run_dir / "log.txt").read_text()
    assert log.index(f"estimated K = {estimate.k}") < log.index("tes epoch 1/1")


def test_labelled_unlabelled_layout_estimates_k_and_a_resume_keeps_it(tmp_path, capsys):
    root = F.write_folder(tmp_path / "data", "labelled")
    argv = tiny_argv(tmp_path / "out", root, "--grad_from_block", "2", "--tes_epochs", "1", "--epochs", "1",
                     "--head_hidden_dim", "64", "--head_bottleneck_dim", "32")
    train.main(argv)  # no --num_classes: the new classes are unknown, so K is estimated
    (run_dir,) = run_dirs(tmp_path / "out", "get", "folder")
    k = json.loads((run_dir / "k_estimate.json").read_text())["k"]
    sizes = json.loads((run_dir / "cluster_sizes.json").read_text())
    assert len(sizes["fused"]) == k
    before = (run_dir / "k_estimate.json").stat().st_mtime_ns
    # A resume takes the checkpoint's K (its meta must agree) instead of estimating it again.
    train.main(argv + ["--resume", "auto"])
    assert (run_dir / "k_estimate.json").stat().st_mtime_ns == before
    assert f"K = {k}, as in {run_dir / 'last.pt'} (estimated there, not again)" in capsys.readouterr().out
    assert len(run_dirs(tmp_path / "out", "get", "folder")) == 1


def test_standalone_estimate_refuses_or_skips_a_bad_image(tmp_path, capsys):
    root = F.write_folder(tmp_path / "data", "train")
    bad = next((root / "train" / "cat").iterdir())
    bad.write_bytes(b"")  # a zero-byte image: its header cannot be read
    argv = tiny_argv(tmp_path, root, "--old_classes", "ant,bee,cat", "--max_classes", "8")
    with pytest.raises(ImageLoadError, match="--skip_bad_images") as refused:
        estimate_k.main(argv)
    assert str(bad) in str(refused.value)
    estimate = estimate_k.main(argv + ["--skip_bad_images"])
    assert 3 <= estimate.k <= 8
    warning = next(line for line in capsys.readouterr().out.splitlines()
                   if "replaced by the next image (--skip_bad_images)" in line)
    assert str(bad) in warning
