"""The image cache (--image_cache, data/image_cache.py): the same views bit for bit, built once,
keyed, never trusted half-built, refused when the disk lacks room."""
from __future__ import annotations

import os
import pickle
import signal
import threading
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import params
from data import image_cache
from data.augmentations import resize_step
from data.data_utils import GCDDataset, RawSplit, load_image
from data.image_cache import CacheFiles, CachedSplit, use_image_cache
from data.loaders import build_loaders
from data.task import task_from_args
from errors import ImageCacheError, ImageLoadError
from tests import data_fixtures as F
from util.dist import DistInfo

DATASETS = ["cifar10", "cifar100", "imagenet_100", "cub", "scars", "aircraft", "herbarium_19", "digits"]
IMAGE_SIZE = 32      # transforms resize to int(32 / 0.875) = 36 px, then crop 32 px
SEEDS = (0, 12345678901)


def vary_image_sizes(root: Path, seed: int = 0) -> None:
    """Rewrite every JPEG of a fixture at another size and aspect ratio (the format's files and
    metadata stay as they are), so the cache holds images of many shapes."""
    rng = np.random.default_rng(seed)
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")):
        width, height = (int(v) for v in rng.integers(12, 80, size=2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def loaders_of(name: str, root: Path, tmp_path: Path, cache: Path | None):
    argv = ["--dataset_name", name, "--data_root", str(root), "--device", "cpu", "--num_workers", "0",
            "--batch_size", "2", "--no-progress"] + (["--image_cache", str(cache)] if cache else [])
    args = params.parse_args(argv)
    return build_loaders(task_from_args(args), args, IMAGE_SIZE, DistInfo())


def same_item(a, b) -> bool:
    """Items of a loader's dataset: tensors (or lists of view tensors) and plain values."""
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_item(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", DATASETS)
def test_views_bit_identical_to_uncached(name, tmp_path):
    """Every training item (two views, label, uq_idx, flag) for the sampler's (index, seed) items
    and every evaluation item are the uncached pipeline's, on each dataset's real format."""
    root = F.make_fixture(name, tmp_path / "data")
    vary_image_sizes(root)
    plain = loaders_of(name, root, tmp_path, None)
    cached = loaders_of(name, root, tmp_path, tmp_path / "cache")
    assert sorted(p.suffix for p in (tmp_path / "cache").glob(f"{name}-*")) == [".npz", ".npz", ".u8", ".u8"]
    assert isinstance(cached.unlabelled.dataset.raw, CachedSplit)
    train_plain, train_cached = plain.train.dataset, cached.train.dataset
    assert len(train_plain) == len(train_cached) > 0
    for index in range(len(train_plain)):
        for seed in SEEDS:
            assert same_item(train_plain[(index, seed)], train_cached[(index, seed)]), (index, seed)
    for split in ("unlabelled", "test"):
        a, b = getattr(plain, split).dataset, getattr(cached, split).dataset
        assert len(a) == len(b) > 0
        assert all(same_item(a[i], b[i]) for i in range(len(a))), split
    # The loaders themselves, batches as training sees them (first epoch's draw).
    for batch_plain, batch_cached in zip(plain.train, cached.train):
        assert same_item(batch_plain, batch_cached)


# ------------------------------------------------------------ a split of awkward files
def awkward_split(folder: Path) -> RawSplit:
    """Files of many shapes and modes, and three unreadable ones (truncated, missing, not an image)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i, (width, height) in enumerate([(500, 375), (375, 500), (64, 64), (1, 40), (300, 7), (37, 36)]):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    grey = Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8))
    grey.save(folder / "grey.png")
    grey.convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (45, 30, 4), dtype=np.uint8)).save(folder / "rgba.png")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(paths[0].read_bytes()[:2000])
    (folder / "text.jpg").write_text("not an image")
    paths += [folder / "grey.png", truncated, folder / "palette.png", folder / "missing.jpg",
              folder / "rgba.png", folder / "text.jpg"]
    return RawSplit("awkward", [str(p) for p in paths], np.zeros(len(paths), dtype=np.int64))


def attach(raw: RawSplit, cache: Path, resize=None, split: str = "train", workers: int = 0,
           info: DistInfo = DistInfo(), skip_log: Path | None = None) -> GCDDataset:
    """A GCDDataset of every image of ``raw`` (no transform) reading from the cache in ``cache``."""
    dataset = GCDDataset(raw, np.arange(len(raw)), {0: 0}, None)
    dataset.skip_log = skip_log
    use_image_cache(str(cache), {split: [dataset]}, resize or resize_step(IMAGE_SIZE), info, workers)
    return dataset


def files_of(raw: RawSplit, cache: Path, resize=None, split: str = "train") -> CacheFiles:
    return CacheFiles.of(cache, raw, split, resize or resize_step(IMAGE_SIZE))


def fingerprint(files: CacheFiles) -> list[tuple[int, int]]:
    return [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (files.data, files.index)]


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_gives_the_resized_image_and_the_same_errors(workers, tmp_path):
    raw = awkward_split(tmp_path / "images")
    resize = resize_step(224)
    cached = attach(raw, tmp_path / "cache", resize, workers=workers).raw
    for index, path in enumerate(raw.images):
        try:
            expected = resize(load_image(path, "awkward"))
        except ImageLoadError as error:
            with pytest.raises(ImageLoadError) as raised:
                cached.image(index)
            assert str(error) in str(raised.value) and "image cache" in str(raised.value)
            continue
        image = cached.image(index)
        assert image.mode == expected.mode == "RGB" and image.size == expected.size
        assert np.array_equal(np.asarray(image), np.asarray(expected)), path
    files = files_of(raw, tmp_path / "cache", resize)
    assert len(cached.cache.errors) == 3
    # The size announced before the build is the size written, plus the truncated JPEG, whose
    # header is intact (its 500x375 pixels would be 256x341).
    assert image_cache.predicted_bytes(raw, resize, 0, False) == files.data.stat().st_size + 256 * 341 * 3


def test_skip_bad_images_replaces_and_records_as_uncached(tmp_path):
    raw = awkward_split(tmp_path / "images")
    plain = GCDDataset(raw, np.arange(len(raw)), {0: 0}, np.asarray)
    plain.skip_log = tmp_path / "plain.txt"
    cached = attach(raw, tmp_path / "cache", skip_log=tmp_path / "cached.txt")
    cached.transform = np.asarray  # resize_step(IMAGE_SIZE) is already applied by the cache
    resize = resize_step(IMAGE_SIZE)
    plain.transform = lambda image: np.asarray(resize(image))
    for index in range(len(raw)):
        (a, ta, ua), (b, tb, ub) = plain[index], cached[index]
        assert np.array_equal(a, b) and (ta, ua) == (tb, ub)
    plain_lines = (tmp_path / "plain.txt").read_text().splitlines()
    cached_lines = (tmp_path / "cached.txt").read_text().splitlines()
    assert len(plain_lines) == len(cached_lines) == 3
    assert all(a in b for a, b in zip(plain_lines, cached_lines))


# ------------------------------------------------------------------ built once, keyed
def test_second_run_reuses_the_cache(tmp_path, monkeypatch):
    raw = awkward_split(tmp_path / "images")
    attach(raw, tmp_path / "cache")
    files = files_of(raw, tmp_path / "cache")
    before = fingerprint(files)

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cache that was in place")

    monkeypatch.setattr(image_cache, "_build", no_build)
    monkeypatch.setattr(image_cache, "predicted_bytes", no_build)
    dataset = attach(raw, tmp_path / "cache")
    assert fingerprint(files) == before
    assert dataset.raw.image(0).size == (int(IMAGE_SIZE / 0.875) * 500 // 375, int(IMAGE_SIZE / 0.875))


def test_another_key_is_another_file(tmp_path):
    raw = awkward_split(tmp_path / "images")
    folder = tmp_path / "cache"
    keyed = [
        files_of(raw, folder),
        files_of(raw, folder, resize_step(64)),                      # another resize size
        files_of(raw, folder, split="test"),                         # another split
        files_of(raw.subset(np.arange(5)), folder),                  # another file list
        files_of(RawSplit("awkward", [str(tmp_path / "elsewhere" / Path(p).name) for p in raw.images],
                          raw.targets), folder),                     # another root
    ]
    assert len({f.data for f in keyed}) == len({f.index for f in keyed}) == len(keyed)
    pixels = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    changed = pixels.copy()
    changed[1, 2, 3, 0] = 1                                          # in-memory: by content
    assert files_of(RawSplit("mem", pixels, np.zeros(3)), folder).data != \
        files_of(RawSplit("mem", changed, np.zeros(3)), folder).data
    assert files_of(RawSplit("mem", pixels, np.zeros(3)), folder).data == \
        files_of(RawSplit("mem", pixels.copy(), np.zeros(3)), folder).data
    # Both sizes built side by side, each read back at its own size.
    small = attach(raw, folder).raw.image(2)
    large = attach(raw, folder, resize_step(64)).raw.image(2)
    assert small.size == (36, 36) and large.size == (73, 73)


# --------------------------------------------------------------- never trusted half-built
def killed_build(raw: RawSplit, folder: Path, at: str) -> None:
    """Build in a forked child that SIGKILLs itself during decoding or between the renames."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup code may run, as with kill -9
        try:
            if at == "decoding":
                real = image_cache._resized_pixels

                def dying(raw, resize, index):
                    if index == 4:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(raw, resize, index)

                image_cache._resized_pixels = dying
            else:
                real_replace = os.replace

                def dying_replace(source, target):
                    if str(target).endswith(".index.npz"):
                        os.kill(os.getpid(), signal.SIGKILL)
                    real_replace(source, target)

                image_cache.os.replace = dying_replace
            attach(raw, folder)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("at", ["decoding", "renaming"])
def test_killed_build_leaves_nothing_trusted(at, tmp_path):
    raw = awkward_split(tmp_path / "images")
    folder = tmp_path / "cache"
    killed_build(raw, folder, at)
    files = files_of(raw, folder)
    assert not files.index.exists() and not files.trusted()
    assert any(folder.glob("*.partial-*"))
    dataset = attach(raw, folder)                       # the next run builds it again
    assert files.trusted() and not list(folder.glob("*.partial-*"))
    expected = resize_step(IMAGE_SIZE)(load_image(raw.images[5], "awkward"))
    assert np.array_equal(np.asarray(dataset.raw.image(5)), np.asarray(expected))


def test_failed_build_cleans_up_and_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    raw = awkward_split(tmp_path / "images")
    folder = tmp_path / "cache"
    real = image_cache._resized_pixels

    def failing(raw, resize, index):
        if index == 3:
            raise RuntimeError("interrupted")
        return real(raw, resize, index)

    monkeypatch.setattr(image_cache, "_resized_pixels", failing)
    with pytest.raises(RuntimeError):
        attach(raw, folder)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]
    monkeypatch.setattr(image_cache, "_resized_pixels", real)
    attach(raw, folder)
    files = files_of(raw, folder)
    with open(files.data, "r+b") as handle:             # a data file cut short is not trusted
        handle.truncate(files.data.stat().st_size - 1)
    assert not files.trusted()
    dataset = attach(raw, folder)
    assert files.trusted()
    expected = resize_step(IMAGE_SIZE)(load_image(raw.images[-2], "awkward"))
    assert np.array_equal(np.asarray(dataset.raw.image(len(raw) - 2)), np.asarray(expected))


# ----------------------------------------------------------------------- disk and ranks
def test_not_enough_disk_is_a_clear_error(tmp_path, monkeypatch):
    raw = awkward_split(tmp_path / "images")
    folder = tmp_path / "cache"
    full = Namespace(total=10**6, used=10**6 - 1000, free=1000)
    monkeypatch.setattr(image_cache.shutil, "disk_usage", lambda path: full)
    with pytest.raises(ImageCacheError) as raised:
        attach(raw, folder)
    message = str(raised.value)
    assert "--image_cache" in message and str(folder) in message and "free" in message
    assert not [p for p in folder.iterdir() if p.name != ".lock"]


def test_other_ranks_wait_for_the_builder(tmp_path, monkeypatch):
    raw = awkward_split(tmp_path / "images")
    folder = tmp_path / "cache"
    monkeypatch.setattr(image_cache, "WAIT_POLL_S", 0.05)
    results = {}
    waiter = threading.Thread(target=lambda: results.update(
        dataset=attach(raw, folder, info=DistInfo(rank=1, world_size=2, local_rank=1))))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not folder.exists()    # a non-builder never builds
    builder = attach(raw, folder, info=DistInfo(rank=0, world_size=2, local_rank=0))
    waiter.join(10)
    assert not waiter.is_alive()
    assert np.array_equal(np.asarray(results["dataset"].raw.image(0)), np.asarray(builder.raw.image(0)))


def test_cache_travels_to_workers_without_its_pixels(tmp_path):
    raw = awkward_split(tmp_path / "images")
    cache = attach(raw, tmp_path / "cache").raw.cache
    first = np.asarray(cache.image(0))
    copy = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 10_000
    assert np.array_equal(np.asarray(copy.image(0)), first)


def test_flag_must_name_a_folder(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(SystemExit):
        params.parse_args(["--dataset_name", "digits", "--device", "cpu", "--image_cache", str(not_a_folder)])
    assert "--image_cache" in capsys.readouterr().err


def test_empty_split(tmp_path):
    """A split without images (the folder dataset's optional test split) has an empty cache."""
    raw = RawSplit("folder", [], np.zeros(0, dtype=np.int64))
    dataset = attach(raw, tmp_path / "cache", split="test")
    assert len(dataset) == 0 and len(dataset.raw.cache) == 0
    assert files_of(raw, tmp_path / "cache", split="test").trusted()
