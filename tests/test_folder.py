"""The folder dataset (your own images, data/folder.py) in both layouts, written as real image
files: the GCD protocol through get_datasets, every layout error with its message, and tiny
end-to-end runs of train.py.

Every fixture image encodes (class code = position in F.FOLDER_CLASSES, serial), so targets
and draws are checked against what the files say, independently of the loaders.
"""
from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

import data_fixtures as F
import params
import train
from data.data_utils import NO_LABEL, train_sample_weights
from data.get_datasets import get_datasets
from data.samplers import WeightedEpochSampler
from data.task import task_from_args
from errors import DatasetNotFoundError
from tests.helpers import run_dirs, scalar_tags

ANT, BEE, CAT, DOG, EEL, FOX = range(6)  # class codes of F.FOLDER_CLASSES


def folder_args(root: Path, **flags) -> Namespace:
    return Namespace(dataset_name="folder", data_root=str(root), prop_train_labels=0.5, **flags)


def codes(dataset) -> list[int]:
    """The class code written into each image of ``dataset`` (items: image, target, uq_idx)."""
    return [F.decode_image(dataset[i][0])[0] for i in range(len(dataset))]


def tiny_folder_argv(out: Path, root: Path, *extra: str) -> list[str]:
    return ["--dataset_name", "folder", "--data_root", str(root), "--clip_model", "GET-tiny",
            "--pretrained", "none", "--device", "cpu", "--grad_from_block", "2", "--tes_epochs", "1",
            "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--head_hidden_dim", "64",
            "--head_bottleneck_dim", "32", "--exp_root", str(out), "--no-progress", *extra]


# ------------------------------------------------------------------ benchmark layout
def test_train_layout_follows_the_benchmark_protocol(tmp_path):
    F.write_folder(tmp_path, "train", n_train=6, n_test=2)
    (tmp_path / "old.txt").write_text("dog\nant\n\ncat\n")
    (tmp_path / "class_names.txt").write_text("ant\tcarpenter ant\ndog\tdingo\n")
    args = task_from_args(folder_args(tmp_path, old_classes=str(tmp_path / "old.txt")))
    # Class ids: the train/ folders sorted; targets: the old classes in the file's order, then the new.
    assert list(args.train_classes) == [DOG, ANT, CAT] and list(args.unlabeled_classes) == [BEE, EEL, FOX]
    assert (args.num_labeled_classes, args.num_unlabeled_classes, args.ground_truth) == (3, 3, True)
    assert list(args.class_names) == ["dingo", "carpenter ant", "cat", "bee", "eel", "fox"]

    train_set, test_set, unlabelled_test, parts = get_datasets("folder", None, None, args)
    remapped = {code: target for target, code in enumerate(args.train_classes + args.unlabeled_classes)}
    for part in (parts["train_labelled"], parts["train_unlabelled"], test_set):
        assert [remapped[c] for c in codes(part)] == part.targets.tolist()
    # uq_idx = position in ImageFolder order (sorted folders, sorted files) = the serial written.
    serials = [F.decode_image(train_set[i][0])[1] for i in range(len(train_set))]
    assert [train_set[i][2] for i in range(len(train_set))] == serials
    # The labelled draw is the reference's: np.random.seed(0); choice over the old-class images.
    all_codes = [c for c in sorted(range(6), key=lambda c: F.FOLDER_CLASSES[c]) for _ in range(6)]
    old_positions = [p for p, c in enumerate(all_codes) if c in (DOG, ANT, CAT)]
    np.random.seed(0)
    chosen = np.random.choice(range(len(old_positions)), size=int(0.5 * len(old_positions)), replace=False)
    assert sorted(parts["train_labelled"].uq_idxs.tolist()) == sorted(old_positions[i] for i in chosen)
    assert (train_set.n_labelled, train_set.n_unlabelled, len(test_set)) == (9, 27, 12)
    assert len(unlabelled_test) == 27 and (unlabelled_test.targets >= 0).all()


def test_train_layout_without_test_folder_and_with_a_comma_list(tmp_path):
    F.write_folder(tmp_path, "train")
    shutil.rmtree(tmp_path / "test")
    args = task_from_args(folder_args(tmp_path, old_classes="eel, bee"))
    assert list(args.train_classes) == [EEL, BEE] and list(args.class_names)[:2] == ["eel", "bee"]
    train_set, test_set, *_ = get_datasets("folder", None, None, args)
    assert len(train_set) == 24 and len(test_set) == 0


# ------------------------------------------------------------------ practitioner layout
def test_labelled_and_unlabelled_layout(tmp_path):
    F.write_folder(tmp_path, "labelled", n_old=3, n_train=4)
    args = task_from_args(folder_args(tmp_path, num_classes=7))
    assert list(args.train_classes) == [ANT, BEE, CAT] and list(args.unlabeled_classes) == []
    assert (args.num_labeled_classes, args.num_unlabeled_classes, args.ground_truth) == (3, 4, False)
    assert list(args.class_names) == ["ant", "bee", "cat"]

    train_set, test_set, unlabelled_test, parts = get_datasets("folder", None, None, args)
    # Every labelled image is labelled (no draw), with its folder's class.
    labelled = parts["train_labelled"]
    assert len(labelled) == 12 and codes(labelled) == labelled.targets.tolist()
    # The unlabelled pile: any nesting, every image once, no label.
    for part in (parts["train_unlabelled"], unlabelled_test):
        assert len(part) == 24 and (part.targets == NO_LABEL).all()
        assert sorted(codes(part)) == sorted(c for c in range(6) for _ in range(4))
    items = [train_set[i] for i in range(len(train_set))]
    assert [uq for _, _, uq, _ in items] == list(range(36))  # unique over the training set
    assert [t for _, t, _, _ in items[12:]] == [NO_LABEL] * 24
    # The test split is the labelled images: the only known classes.
    assert codes(test_set) == test_set.targets.tolist() == labelled.targets.tolist()
    # The weighted sampler draws both parts.
    drawn = [i for i, _ in WeightedEpochSampler(train_sample_weights(train_set), 8, seed=0)]
    assert min(drawn) < 12 <= max(drawn)


def test_the_number_of_classes_must_cover_the_old_ones(tmp_path):
    F.write_folder(tmp_path, "labelled", n_old=3)
    with pytest.raises(ValueError, match="K = 2 .* fewer than the 3 old classes"):
        task_from_args(folder_args(tmp_path, num_classes=2))


# ------------------------------------------------------------------ errors
def error_of(root: Path, **flags) -> str:
    """The message of the DatasetNotFoundError that reading the folder dataset raises."""
    with pytest.raises(DatasetNotFoundError) as error:
        args = task_from_args(folder_args(root, **flags))
        get_datasets("folder", None, None, args)
        list(args.class_names)
    message = str(error.value)
    assert str(root) in message and "--data_root" in message and "GET_FOLDER_ROOT" in message
    return message


def test_an_old_class_without_a_folder(tmp_path):
    F.write_folder(tmp_path, "train")
    message = error_of(tmp_path, old_classes="ant,cow")
    assert "'cow'" in message and str(tmp_path / "train" / "cow") in message
    assert "Correct the name or add the folder" in message
    (tmp_path / "old.txt").write_text("ant\ncow\n")
    assert str(tmp_path / "old.txt") in error_of(tmp_path, old_classes=str(tmp_path / "old.txt"))


@pytest.mark.parametrize("layout, folder", [("train", "train/bee"), ("train", "test/eel"),
                                            ("labelled", "labelled/cat")])
def test_a_folder_without_images(tmp_path, layout, folder):
    F.write_folder(tmp_path, layout)
    shutil.rmtree(tmp_path / folder)
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "notes.txt").write_text("not an image")
    message = error_of(tmp_path, old_classes="ant,bee" if layout == "train" else None)
    assert f"{tmp_path / folder} holds no image" in message and ".jpg" in message
    assert "put the class's images there or remove the folder" in message


def test_a_folder_whose_images_all_fail_to_open(tmp_path):
    F.write_folder(tmp_path, "labelled")
    for path in (tmp_path / "labelled" / "bee").iterdir():
        path.write_bytes(b"not an image")
    message = error_of(tmp_path)
    assert f"{tmp_path / 'labelled' / 'bee'} holds no readable image" in message
    assert "none of its 4 image files opens" in message


@pytest.mark.parametrize("state", ["empty", "missing"])
def test_an_empty_or_missing_unlabelled_pile(tmp_path, state):
    F.write_folder(tmp_path, "labelled")
    shutil.rmtree(tmp_path / "unlabelled")
    if state == "empty":
        (tmp_path / "unlabelled" / "day1").mkdir(parents=True)
    message = error_of(tmp_path)
    assert str(tmp_path / "unlabelled") in message
    assert "put the images without labels there (any sub-folders)" in message


def test_a_names_file_with_unknown_folders(tmp_path):
    F.write_folder(tmp_path, "labelled")
    (tmp_path / "class_names.txt").write_text("ant\tant\nfox\tred fox\n")  # fox: not a labelled class
    message = error_of(tmp_path)
    assert str(tmp_path / "class_names.txt") in message and "['fox']" in message
    assert "Write each folder's exact name, or delete those lines" in message
    (tmp_path / "class_names.txt").write_text("ant red ant\n")
    assert "line 1 is not '<folder><TAB><name>'" in error_of(tmp_path)


@pytest.mark.parametrize("setup, flags, expected", [
    (lambda root: F.write_folder(root, "train"), {}, "needs --old_classes"),
    (lambda root: F.write_folder(root, "labelled"), {"old_classes": "ant"}, "drop --old_classes"),
    (lambda root: root.mkdir(exist_ok=True), {}, "has neither train/"),
    (lambda root: (F.write_folder(root, "train"), F.write_folder(root, "labelled")), {"old_classes": "ant"},
     "has both train/ and labelled/"),
    (lambda root: None, {}, "does not exist"),
])
def test_layout_mistakes(tmp_path, setup, flags, expected):
    root = tmp_path / "mine"
    setup(root)
    assert expected in error_of(root, **flags)


def test_a_layout_mistake_leaves_no_run_folder(tmp_path):
    root = F.write_folder(tmp_path / "data", "train")
    with pytest.raises(DatasetNotFoundError, match="cow"):
        train.main(tiny_folder_argv(tmp_path / "out", root, "--old_classes", "ant,cow"))
    (root / "class_names.txt").write_text("cow\tcow\n")
    with pytest.raises(DatasetNotFoundError, match="cow"):
        train.main(tiny_folder_argv(tmp_path / "out", root, "--old_classes", "ant"))
    assert not (tmp_path / "out").exists()


def test_flags(tmp_path):
    with pytest.raises(SystemExit):
        params.parse_args(["--dataset_name", "cub", "--old_classes", "a,b", "--device", "cpu"])
    for bad in ("0", "many", "-3"):
        with pytest.raises(SystemExit):
            params.parse_args(["--num_classes", bad, "--device", "cpu"])
    assert params.parse_args(["--num_classes", "12", "--device", "cpu"]).num_classes == 12
    assert params.parse_args(["--num_classes", "auto", "--device", "cpu"]).num_classes == "auto"


# ------------------------------------------------------------------ end to end
def test_benchmark_layout_end_to_end(tmp_path):
    root = F.write_folder(tmp_path / "data", "train")
    shutil.rmtree(root / "test")  # no test split: the transductive evaluation alone
    (root / "old.txt").write_text("ant\nbee\ncat\n")
    metrics = train.main(tiny_folder_argv(tmp_path / "out", root, "--old_classes", str(root / "old.txt")))
    assert metrics["train_unlabelled/n_samples"] == 18 and not any(k.startswith("test/") for k in metrics)
    (run_dir,) = run_dirs(tmp_path / "out", "get", "folder")
    assert (run_dir / "best.pt").is_file() and not (run_dir / "k_estimate.json").exists()


def test_labelled_unlabelled_layout_end_to_end(tmp_path):
    root = F.write_folder(tmp_path / "data", "labelled")
    metrics = train.main(tiny_folder_argv(tmp_path / "out", root, "--num_classes", "5"))
    (run_dir,) = run_dirs(tmp_path / "out", "get", "folder")
    # What can be known: cluster sizes, the unlabelled images in old-class clusters, the
    # accuracy on the labelled images.
    sizes = json.loads((run_dir / "cluster_sizes.json").read_text())
    assert set(sizes) == {"visual", "text", "fused"}
    assert all(len(s) == 5 and sum(s) == 24 for s in sizes.values())
    assert metrics["train_unlabelled/n_samples"] == 24 and metrics["train_labelled/n_samples"] == 12
    for head in ("visual", "text", "fused"):
        share = sum(sizes[head][:3]) / 24
        assert metrics[f"train_unlabelled/{head}/old_share"] == pytest.approx(share)
        assert metrics[f"train_unlabelled/{head}/clusters_used"] == sum(s > 0 for s in sizes[head])
        assert 0 <= metrics[f"train_labelled/{head}/acc"] <= 1
    # How alike the heads cluster the images needs no label either.
    for split in ("train_unlabelled", "test"):
        same, matched = metrics[f"{split}/agreement/same"], metrics[f"{split}/agreement/matched"]
        assert 0 <= same <= matched <= 1
    assert json.loads((run_dir / "final_metrics.json").read_text()) == metrics
    log = (run_dir / "log.txt").read_text()
    assert "no ground truth" in log and "best.pt is the last epoch" in log and "after matching their cluster ids" in log
    assert {"eval/train_unlabelled/fused/old_share", "eval/train_labelled/fused/acc"} <= scalar_tags(run_dir)
    # best.pt falls back to the last epoch; K is in every checkpoint.
    best, last = (torch.load(run_dir / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert best["loop"]["epoch"] == last["loop"]["epoch"] == 1 and best["meta"]["num_classes"] == 5

    # --stage eval of that checkpoint describes the clusters again, identically.
    again = train.main(tiny_folder_argv(tmp_path / "out", root, "--num_classes", "5", "--stage", "eval",
                                        "--eval_checkpoint", str(run_dir / "last.pt"), "--exp_name", "eval"))
    assert again == metrics


def test_stage_1_alone_writes_no_best_checkpoint_without_ground_truth(tmp_path):
    # best.pt holds an evaluated stage-2 model; stage 1 is never evaluated.
    root = F.write_folder(tmp_path / "data", "labelled")
    train.main(tiny_folder_argv(tmp_path / "out", root, "--num_classes", "5", "--stage", "tes"))
    (run_dir,) = run_dirs(tmp_path / "out", "get", "folder")
    assert (run_dir / "tes.pt").is_file() and not (run_dir / "best.pt").exists()
