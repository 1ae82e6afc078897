"""GCD data protocol on small datasets written in each real on-disk format.

Every fixture image encodes its class and its serial number (its position in
the format's dataset order), so targets, names, uq_idx and the labelled draw
are checked against values computed here from the fixture, independently of
the loaders.
"""
from __future__ import annotations

import pickle
import re
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from scipy.io import loadmat

import config
import data_fixtures as F
import params
from data.get_datasets import get_datasets
from data.task import task_from_args

DATASETS = ["cifar10", "cifar100", "imagenet_100", "imagenet_1k", "cub", "scars", "aircraft", "herbarium_19"]
N_TRAIN, N_TEST = 4, 2

# (K_old, K) per dataset, from the table of docs/method.md, "Data".
SPEC_SIZES = {
    "cifar10": (5, 10), "cifar100": (80, 100), "imagenet_100": (50, 100), "imagenet_1k": (500, 1000),
    "cub": (100, 200), "scars": (98, 196), "aircraft": (50, 100), "herbarium_19": (341, 683), "digits": (5, 10),
}
ENV_VARS = {
    "cifar10": "GET_CIFAR10_ROOT", "cifar100": "GET_CIFAR100_ROOT", "imagenet_100": "GET_IMAGENET_ROOT",
    "imagenet_1k": "GET_IMAGENET_ROOT", "cub": "GET_CUB_ROOT", "scars": "GET_SCARS_ROOT",
    "aircraft": "GET_AIRCRAFT_ROOT", "herbarium_19": "GET_HERB19_ROOT",
}


def original_class(dataset_name: str, code: int) -> int:
    """Protocol class id of an image's encoded class (Herbarium encodes the folder's category id)."""
    if dataset_name == "herbarium_19":
        return sorted(str(c) for c in range(683)).index(str(code))
    return code


def reference_labelled_serials(train_items: list[tuple[int, int]], old: list[int], prop: float) -> set[int]:
    """The reference draw: seed 0, then np.random.choice over the old-class images in dataset order.

    train_items: (serial, original class) of every training image.
    """
    old_serials = [serial for serial, cls in sorted(train_items) if cls in set(old)]
    np.random.seed(0)
    chosen = np.random.choice(range(len(old_serials)), size=int(prop * len(old_serials)), replace=False)
    return {old_serials[i] for i in chosen}


def class_names(args: Namespace) -> list[str]:
    """The task's class names, in remapped label order."""
    return list(task_from_args(args).class_names)


def build(dataset_name: str, root: Path, classes: list[int] | None = None) -> dict:
    """Write a fixture, load it with decode_image as transform, read every item."""
    if classes is None:
        F.make_fixture(dataset_name, root, N_TRAIN, N_TEST)
    else:
        F.WRITERS[dataset_name](root, classes, N_TRAIN, N_TEST)
    args = Namespace(dataset_name=dataset_name, data_root=str(root), prop_train_labels=0.5)
    task = task_from_args(args)
    train, test, unlabelled_test, parts = get_datasets(dataset_name, F.decode_image, F.decode_image, task)

    def read(dataset) -> list[dict]:
        items = []
        for index in range(len(dataset)):
            (code, serial), target, uq_idx, *flag = dataset[index]
            items.append(dict(cls=original_class(dataset_name, code), code=code, serial=serial,
                              target=target, uq_idx=uq_idx, flag=flag))
        return items

    return dict(name=dataset_name, root=root, args=args, task=task, train=train, test=test, unlabelled_test=unlabelled_test,
                parts=parts, merged_items=read(train), labelled=read(parts["train_labelled"]),
                unlabelled=read(parts["train_unlabelled"]), test_items=read(test),
                unlabelled_test_items=read(unlabelled_test), names=class_names(args))


@pytest.fixture(scope="module", params=DATASETS)
def loaded(request, tmp_path_factory) -> dict:
    """One fixture per dataset, built once for all the tests of this module."""
    return build(request.param, tmp_path_factory.mktemp(request.param))


def test_class_splits_follow_spec(loaded):
    args = loaded["task"]
    old, new = F.split_lists(loaded["name"])
    assert list(args.train_classes) == old and list(args.unlabeled_classes) == new
    num_classes = args.num_labeled_classes + args.num_unlabeled_classes
    assert (args.num_labeled_classes, num_classes) == SPEC_SIZES[loaded["name"]]
    assert len(set(old) | set(new)) == SPEC_SIZES[loaded["name"]][1]


def test_sizes(loaded):
    num_classes = 6  # make_fixture writes 3 old + 3 new classes
    n_old_images = 3 * N_TRAIN
    assert len(loaded["train"]) == num_classes * N_TRAIN
    assert loaded["train"].n_labelled == int(0.5 * n_old_images)
    assert loaded["train"].n_unlabelled == num_classes * N_TRAIN - int(0.5 * n_old_images)
    assert len(loaded["test"]) == num_classes * N_TEST
    assert len(loaded["unlabelled_test"]) == loaded["train"].n_unlabelled


def test_targets_are_remapped(loaded):
    old, new = F.split_lists(loaded["name"])
    order = old + new
    for key in ("labelled", "unlabelled", "test_items", "unlabelled_test_items", "merged_items"):
        for item in loaded[key]:
            assert item["target"] == order.index(item["cls"]), (key, item)


def test_labelled_draw_matches_reference(loaded):
    old, _ = F.split_lists(loaded["name"])
    train_items = [(i["serial"], i["cls"]) for i in loaded["labelled"] + loaded["unlabelled"]]
    assert {i["serial"] for i in loaded["labelled"]} == reference_labelled_serials(train_items, old, 0.5)
    assert all(i["target"] < len(old) for i in loaded["labelled"])


def test_uq_idx_partition(loaded):
    labelled = [i["uq_idx"] for i in loaded["labelled"]]
    unlabelled = [i["uq_idx"] for i in loaded["unlabelled"]]
    assert not set(labelled) & set(unlabelled)
    assert sorted(labelled + unlabelled) == list(range(len(loaded["train"])))
    # uq_idx is the position in the format's dataset order.
    assert all(i["uq_idx"] == i["serial"] for i in loaded["labelled"] + loaded["unlabelled"])


def test_merged_dataset_layout(loaded):
    n_labelled = loaded["train"].n_labelled
    flags = [i["flag"][0] for i in loaded["merged_items"]]
    assert flags == [True] * n_labelled + [False] * (len(flags) - n_labelled)
    assert [i["uq_idx"] for i in loaded["merged_items"]] == [
        i["uq_idx"] for i in loaded["labelled"] + loaded["unlabelled"]
    ]


def test_unlabelled_eval_set_uses_test_transform(loaded):
    assert [i["uq_idx"] for i in loaded["unlabelled_test_items"]] == [i["uq_idx"] for i in loaded["unlabelled"]]
    assert loaded["unlabelled_test"] is not loaded["parts"]["train_unlabelled"]


def test_class_names_aligned_with_targets(loaded):
    names = loaded["names"]
    assert len(names) == SPEC_SIZES[loaded["name"]][1]
    for item in loaded["merged_items"] + loaded["test_items"]:
        assert names[item["target"]] == F.class_name(loaded["name"], item["code"])


def reference_names(dataset_name: str, root: Path) -> list[str]:
    """Names by original class id: the reference's recipe applied to the fixture's own metadata."""
    if dataset_name in ("cifar10", "cifar100"):
        folder, meta, key = {"cifar10": ("cifar-10-batches-py", "batches.meta", "label_names"),
                             "cifar100": ("cifar-100-python", "meta", "fine_label_names")}[dataset_name]
        with open(root / folder / meta, "rb") as handle:
            return pickle.load(handle, encoding="latin1")[key]  # torchvision's `classes`, as is
    if dataset_name == "cub":
        # "<id> NNN.Name_With_Underscores": drop the "NNN." prefix, keep the rest verbatim.
        text = (root / "CUB_200_2011" / "classes.txt").read_text(encoding="utf-8")
        rows = [re.fullmatch(r"(\d+) \d{3}\.(.+)", line).groups() for line in text.splitlines()]
        return [name for _, name in sorted(rows, key=lambda row: int(row[0]))]
    if dataset_name == "scars":
        return [str(n) for n in loadmat(root / "devkit" / "cars_meta.mat", squeeze_me=True)["class_names"]]
    if dataset_name == "aircraft":
        return sorted((root / "data" / "variants.txt").read_text(encoding="utf-8").splitlines())
    if dataset_name in ("imagenet_100", "imagenet_1k"):
        return F.imagenet_reference_names()
    if dataset_name == "herbarium_19":
        return [F.class_name("herbarium_19", F.herbarium_category(c)) for c in range(683)]
    raise ValueError(dataset_name)


def test_class_names_follow_reference_recipe(loaded):
    old, new = F.split_lists(loaded["name"])
    by_id = reference_names(loaded["name"], loaded["root"])
    assert loaded["names"] == [by_id[c] for c in old + new]
    explicit = class_names(Namespace(**{**vars(loaded["args"]), "class_names": "reference"}))
    assert explicit == loaded["names"]
    if loaded["name"] in ("cifar10", "cifar100", "cub"):
        assert all("_" in name for name in loaded["names"])  # underscores kept


def test_tidy_class_names(loaded):
    args = Namespace(**{**vars(loaded["args"]), "class_names": "tidy"})
    tidy = class_names(args)
    if loaded["name"] in ("imagenet_100", "imagenet_1k"):
        old, new = F.split_lists(loaded["name"])
        assert tidy == [IMAGENET_CLASSNAMES[c] for c in old + new]
    else:
        assert tidy == [name.replace("_", " ") for name in loaded["names"]]
    assert not any("_" in name for name in tidy)


def test_shipped_imagenet_names():
    names = F.imagenet_reference_names()
    assert len(names) == 1000
    # Known entries of the reference's list (not open_clip's "rooster", "hammerhead shark").
    assert (names[0], names[4], names[7], names[8], names[999]) == (
        "tench", "hammerhead", "cock", "hen", "toilet tissue")
    assert names[134] == names[517] == "crane" and names[638] == names[639] == "maillot"
    assert class_names(Namespace(dataset_name="imagenet_1k")) == names
    np.random.seed(0)
    subset = np.sort(np.random.choice(range(1000), 100, replace=False))
    names_100 = class_names(Namespace(dataset_name="imagenet_100"))
    assert names_100[:5] == [names[i] for i in subset[:5]]
    assert names_100 == [names[i] for i in subset]
    assert class_names(Namespace(dataset_name="imagenet_1k", class_names="tidy"))[7] == "rooster"


def test_class_names_flag():
    assert params.parse_args(["--device", "cpu"]).class_names == "reference"
    assert params.parse_args(["--device", "cpu", "--class_names", "tidy"]).class_names == "tidy"
    with pytest.raises(SystemExit):
        params.parse_args(["--device", "cpu", "--class_names", "pretty"])


def test_test_split_disjoint_and_complete(loaded):
    n_train = len(loaded["train"])
    train_serials = {i["serial"] for i in loaded["merged_items"]}
    test_serials = [i["serial"] for i in loaded["test_items"]]
    assert not train_serials & set(test_serials)
    assert sorted(test_serials) == list(range(n_train, n_train + len(test_serials)))
    assert [i["uq_idx"] for i in loaded["test_items"]] == list(range(len(test_serials)))
    counts = {}
    for item in loaded["test_items"]:
        counts[item["cls"]] = counts.get(item["cls"], 0) + 1
    expected = [original_class(loaded["name"], c) for c in F.default_classes(loaded["name"])]
    assert counts == {c: N_TEST for c in expected}


def test_old_classes_are_the_first_targets(loaded):
    targets = np.array([i["target"] for i in loaded["unlabelled"]])
    old, _ = F.split_lists(loaded["name"])
    expected = np.array([i["cls"] in set(old) for i in loaded["unlabelled"]])
    np.testing.assert_array_equal(targets < loaded["task"].num_labeled_classes, expected)


def test_herbarium_names_follow_folder_not_index(tmp_path):
    # String order of these folders differs from numeric order ("10" < "100" < "2" < "9").
    categories = [9, 10, 100, 101, 19, 2, 20, 200]
    loaded = build("herbarium_19", tmp_path, categories)
    string_order = sorted(str(c) for c in range(683))
    assert string_order.index("10") < string_order.index("9")
    old, new = F.split_lists("herbarium_19")
    with open(Path(config.REPO_ROOT) / "data" / "herb_categories.txt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()[1:]
    by_category = {}
    for line in lines:
        category, name = line.split(",", 1)
        by_category[int(category)] = name.strip('"')
    seen = set()
    for item in loaded["merged_items"] + loaded["test_items"]:
        class_id = string_order.index(str(item["code"]))
        assert item["target"] == (old + new).index(class_id)
        assert loaded["names"][item["target"]] == by_category[item["code"]]
        seen.add(item["code"])
    assert seen == set(categories)
    # ImageFolder order: folder "10" (and its images) come before folder "9".
    first_serial = {}
    for item in loaded["merged_items"]:
        first_serial[item["code"]] = min(first_serial.get(item["code"], 10**6), item["serial"])
    assert [c for c, _ in sorted(first_serial.items(), key=lambda kv: kv[1])] == sorted(categories, key=str)
    train_items = [(i["serial"], i["cls"]) for i in loaded["labelled"] + loaded["unlabelled"]]
    assert {i["serial"] for i in loaded["labelled"]} == reference_labelled_serials(train_items, old, 0.5)


def test_digits_demo():
    from sklearn.datasets import load_digits

    args = Namespace(dataset_name="digits", data_root=None, prop_train_labels=0.5)
    train, test, unlabelled_test, parts = get_datasets("digits", None, None, args)
    digits = load_digits()
    train_ids = [i for i in range(len(digits.target)) if i % 5 != 0]
    test_ids = [i for i in range(len(digits.target)) if i % 5 == 0]
    assert (len(train), len(test)) == (len(train_ids), len(test_ids)) == (1437, 360)
    np.testing.assert_array_equal(test.targets, digits.target[test_ids])
    all_train_targets = digits.target[train_ids]
    old_positions = [p for p, t in enumerate(all_train_targets) if t < 5]
    np.random.seed(0)
    chosen = np.random.choice(range(len(old_positions)), size=int(0.5 * len(old_positions)), replace=False)
    assert set(parts["train_labelled"].uq_idxs.tolist()) == {old_positions[i] for i in chosen}
    image, target, uq_idx = parts["train_unlabelled"][7]
    assert image.mode == "RGB" and image.size == (32, 32) and target == all_train_targets[uq_idx]
    grey = digits.images[train_ids[uq_idx]]
    pixels = np.asarray(image)
    for row in range(32):
        for col in range(32):
            expected = round(255 - grey[row // 4, col // 4] * 255 / 16)
            assert tuple(pixels[row, col]) == (expected,) * 3
    assert class_names(args)[3] == "three"


def test_config_defaults_and_overrides(monkeypatch, tmp_path):
    repo = Path(__file__).resolve().parent.parent
    for name, variable in ENV_VARS.items():
        monkeypatch.delenv(variable, raising=False)
        assert config.root_env_var(name) == variable
        assert config.dataset_root(name).parent == repo / "datasets"
    monkeypatch.setenv("GET_IMAGENET_ROOT", str(tmp_path / "env"))
    assert config.dataset_root("imagenet_100") == config.dataset_root("imagenet_1k") == tmp_path / "env"
    assert config.dataset_root("imagenet_1k", str(tmp_path / "arg")) == tmp_path / "arg"
    monkeypatch.delenv("GET_OUTPUT_ROOT", raising=False)
    assert config.output_root() == repo / "outputs"
    monkeypatch.setenv("GET_OUTPUT_ROOT", str(tmp_path / "out"))
    assert config.output_root() == tmp_path / "out"
    assert config.output_root(tmp_path / "flag") == tmp_path / "flag"
    assert set(config.dataset_names()) == set(SPEC_SIZES) | {"folder"}  # folder: your own classes


def test_root_from_environment_variable(monkeypatch, tmp_path):
    F.make_fixture("cub", tmp_path, N_TRAIN, N_TEST)
    monkeypatch.setenv("GET_CUB_ROOT", str(tmp_path))
    args = Namespace(dataset_name="cub", data_root=None, prop_train_labels=0.5)
    train, *_ = get_datasets("cub", None, None, args)
    assert len(train) == 6 * N_TRAIN
    monkeypatch.setenv("GET_CUB_ROOT", str(tmp_path / "elsewhere"))
    args.data_root = str(tmp_path)
    assert len(get_datasets("cub", None, None, args)[0]) == 6 * N_TRAIN
