"""Bad input to the data layer fails early with a message that says how to fix it."""
from __future__ import annotations

import shutil
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pytest

import config
import data_fixtures as F
from data.augmentations import get_transforms
from data.data_utils import MergedDataset, train_sample_weights
from data.get_datasets import get_datasets
from data.task import task_from_args
from errors import DatasetNotFoundError, ImageLoadError

ENV_VARS = {
    "cifar10": "GET_CIFAR10_ROOT", "cifar100": "GET_CIFAR100_ROOT", "imagenet_100": "GET_IMAGENET_ROOT",
    "imagenet_1k": "GET_IMAGENET_ROOT", "cub": "GET_CUB_ROOT", "scars": "GET_SCARS_ROOT",
    "aircraft": "GET_AIRCRAFT_ROOT", "herbarium_19": "GET_HERB19_ROOT",
}

# dataset -> a file or folder of the real layout whose absence must be reported.
ESSENTIAL = {
    "cifar10": "cifar-10-batches-py/data_batch_3",
    "cifar100": "cifar-100-python/train",
    "imagenet_100": "val",
    "imagenet_1k": "train",
    "cub": "CUB_200_2011/image_class_labels.txt",
    "scars": "devkit/cars_train_annos.mat",
    "aircraft": "data/images_variant_test.txt",
    "herbarium_19": "small-validation",
}

# dataset -> the metadata file that holds the class names.
NAMES_FILE = {
    "cifar10": "cifar-10-batches-py/batches.meta",
    "cifar100": "cifar-100-python/meta",
    "cub": "CUB_200_2011/classes.txt",
    "scars": "devkit/cars_meta.mat",
    "aircraft": "data/variants.txt",
}


def args_for(name: str, root: Path | None) -> Namespace:
    return Namespace(dataset_name=name, data_root=None if root is None else str(root), prop_train_labels=0.5)


def assert_names_fix(message: str, path: Path, name: str) -> None:
    assert str(path) in message
    assert ENV_VARS[name] in message
    assert "--data_root" in message
    assert name in message


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


@pytest.mark.parametrize("name", sorted(ENV_VARS))
def test_missing_root(name, tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as error:
        get_datasets(name, None, None, args_for(name, root))
    assert isinstance(error.value, FileNotFoundError)
    assert_names_fix(str(error.value), root, name)


@pytest.mark.parametrize("name", sorted(ENV_VARS))
def test_missing_root_through_environment(name, tmp_path, monkeypatch):
    root = tmp_path / "from_env"
    monkeypatch.setenv(ENV_VARS[name], str(root))
    with pytest.raises(DatasetNotFoundError) as error:
        get_datasets(name, None, None, args_for(name, None))
    assert_names_fix(str(error.value), root, name)


@pytest.mark.parametrize("name", sorted(ESSENTIAL))
def test_incomplete_root(name, tmp_path):
    F.make_fixture(name, tmp_path, 2, 1)
    remove(tmp_path / ESSENTIAL[name])
    with pytest.raises(DatasetNotFoundError) as error:
        get_datasets(name, None, None, args_for(name, tmp_path))
    assert_names_fix(str(error.value), tmp_path / ESSENTIAL[name], name)


@pytest.mark.parametrize("name, split, folder", [
    ("imagenet_1k", "train", "n15075141"),      # the last class, without any fixture image
    ("imagenet_100", "val", None),              # a class of the subset that has images
    ("herbarium_19", "small-train", "0"),
])
def test_missing_class_folder_stops_the_run(name, split, folder, tmp_path):
    F.make_fixture(name, tmp_path, 2, 1)
    if folder is None:
        folder = F._imagenet_wnids()[F.default_classes(name)[0]]
    shutil.rmtree(tmp_path / split / folder)
    with pytest.raises(DatasetNotFoundError, match=rf"lacks 1 of the .* e\.g\. \['{folder}'\]") as error:
        get_datasets(name, None, None, args_for(name, tmp_path))
    assert_names_fix(str(error.value), tmp_path / split, name)


@pytest.mark.parametrize("name", sorted(NAMES_FILE))
def test_missing_class_names_file(name, tmp_path):
    F.make_fixture(name, tmp_path, 2, 1)
    remove(tmp_path / NAMES_FILE[name])
    with pytest.raises(DatasetNotFoundError) as error:
        task_from_args(args_for(name, tmp_path))
    assert_names_fix(str(error.value), tmp_path / NAMES_FILE[name], name)


def test_truncated_class_list(tmp_path):
    F.make_fixture("cub", tmp_path, 2, 1)
    classes = tmp_path / "CUB_200_2011" / "classes.txt"
    classes.write_text("\n".join(classes.read_text().splitlines()[:150]) + "\n")
    with pytest.raises(DatasetNotFoundError) as error:
        task_from_args(args_for("cub", tmp_path))
    assert_names_fix(str(error.value), classes, "cub")


def test_scars_test_labels_in_devkit_are_accepted(tmp_path):
    F.make_fixture("scars", tmp_path, 2, 1)
    (tmp_path / "cars_test_annos_withlabels.mat").rename(tmp_path / "devkit" / "cars_test_annos_withlabels.mat")
    _, test, _, _ = get_datasets("scars", None, None, args_for("scars", tmp_path))
    assert len(test) == 6
    (tmp_path / "devkit" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetNotFoundError) as error:
        get_datasets("scars", None, None, args_for("scars", tmp_path))
    assert_names_fix(str(error.value), tmp_path / "cars_test_annos_withlabels.mat", "scars")


def test_imagenet_flat_validation_folder(tmp_path):
    F.make_fixture("imagenet_1k", tmp_path, 2, 1)
    val = tmp_path / "val"
    for image in list(val.rglob("*.JPEG")):
        image.rename(val / image.name)
    for folder in [p for p in val.iterdir() if p.is_dir()]:
        folder.rmdir()
    with pytest.raises(DatasetNotFoundError, match="class folders") as error:
        get_datasets("imagenet_1k", None, None, args_for("imagenet_1k", tmp_path))
    assert_names_fix(str(error.value), val, "imagenet_1k")


@pytest.mark.parametrize("name, folder", [("imagenet_1k", "train/not_a_wnid"), ("herbarium_19", "small-train/abc")])
def test_unknown_class_folder(name, folder, tmp_path):
    F.make_fixture(name, tmp_path, 2, 1)
    (tmp_path / folder).mkdir()
    with pytest.raises(DatasetNotFoundError, match=Path(folder).name) as error:
        get_datasets(name, None, None, args_for(name, tmp_path))
    assert ENV_VARS[name] in str(error.value)


def test_aircraft_variant_not_in_variants_file(tmp_path):
    F.make_fixture("aircraft", tmp_path, 2, 1)
    annotations = tmp_path / "data" / "images_variant_trainval.txt"
    annotations.write_text(annotations.read_text() + "1999999 Concorde\n")
    with pytest.raises(DatasetNotFoundError, match="Concorde"):
        get_datasets("aircraft", None, None, args_for("aircraft", tmp_path))


@pytest.mark.parametrize("call", ["get_datasets", "task_from_args", "dataset_root"])
def test_unknown_dataset_name(call):
    with pytest.raises(ValueError) as error:
        if call == "get_datasets":
            get_datasets("cub2011", None, None, args_for("cub2011", None))
        elif call == "task_from_args":
            task_from_args(args_for("cub2011", None))
        else:
            config.dataset_root("cub2011")
    for valid in ("cifar10", "cub", "herbarium_19", "digits", "imagenet_1k"):
        assert valid in str(error.value)


def test_digits_has_no_root():
    with pytest.raises(ValueError, match="no root"):
        config.dataset_root("digits")


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_image_file_names_file_and_dataset(damage, tmp_path):
    F.make_fixture("cub", tmp_path, 2, 1)
    _, _, _, parts = get_datasets("cub", None, None, args_for("cub", tmp_path))
    path = Path(parts["train_labelled"].raw.images[parts["train_labelled"].uq_idxs[0]])
    if damage == "corrupt":
        path.write_bytes(b"this is not a jpeg")
    else:
        path.unlink()
    with pytest.raises(ImageLoadError) as error:
        parts["train_labelled"][0]
    assert str(path) in str(error.value) and "'cub'" in str(error.value)


def test_download_only_for_cifar(tmp_path):
    F.make_fixture("cub", tmp_path, 2, 1)
    args = args_for("cub", tmp_path)
    args.download = True
    with pytest.raises(ValueError, match="cifar10"):
        task_from_args(args)


def test_no_training_images_of_split_classes(tmp_path):
    F.write_cub(tmp_path, [], 2, 1)
    (tmp_path / "CUB_200_2011" / "images").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no training image") as error:
        get_datasets("cub", None, None, args_for("cub", tmp_path))
    assert_names_fix(str(error.value), tmp_path, "cub")


def test_sampler_needs_both_groups():
    merged = MergedDataset(list(range(3)), [])
    with pytest.raises(ValueError, match="unlabelled"):
        train_sample_weights(merged)


def test_unknown_normalization():
    with pytest.raises(ValueError, match="imagenet"):
        get_transforms(32, normalization="laion")


def test_images_of_classes_outside_the_lists_are_left_out(tmp_path):
    F.make_fixture("cub", tmp_path, 2, 1)
    task = task_from_args(args_for("cub", tmp_path))
    dropped = task.train_classes[0]
    task = replace(task, train_classes=task.train_classes[1:])
    train, test, _, _ = get_datasets("cub", F.decode_image, F.decode_image, task)
    assert (len(train), len(test)) == (5 * 2, 5 * 1)
    assert all(train[i][0][0] != dropped for i in range(len(train)))
