"""Input nobody checked: a CIFAR pickle that would run code, bad images in a folder dataset,
link loops, 16-bit images, text files with a byte-order mark or in Latin-1, names that are not
UTF-8, an image cache folder that cannot be written and a build stopped by a signal.

Everything is written in its real format in a temporary folder and read by the real readers.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import struct
import zlib
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_fixtures as F
import params
from data.augmentations import resize_step
from data.data_utils import GCDDataset, RawSplit, count_skipped_images, load_image
from data.get_datasets import get_datasets
from data.image_cache import CacheFiles, use_image_cache
from data.loaders import build_loaders
from data.task import task_from_args
from errors import DatasetNotFoundError, ImageCacheError, ImageLoadError, InputError
from util.dist import DistInfo
from util.logging_utils import get_logger

ANT, BEE, CAT, DOG, EEL, FOX = range(6)  # class codes of F.FOLDER_CLASSES
LATIN1_NAME = os.fsdecode(b"caf\xe9")   # what Python makes of a Latin-1 file name: 'caf\udce9'


def folder_args(root: Path, **flags) -> Namespace:
    return Namespace(dataset_name="folder", data_root=str(root), prop_train_labels=0.5, **flags)


def folder_loaders(root: Path, *flags: str, skip_log: Path | None = None):
    args = params.parse_args(["--dataset_name", "folder", "--data_root", str(root), "--device", "cpu",
                              "--num_workers", "0", "--batch_size", "2", "--no-progress", *flags])
    return build_loaders(task_from_args(args), args, 32, DistInfo(), skip_log)


def codes_and_targets(dataset) -> tuple[list[int], list[int]]:
    """The class code written into each image of ``dataset`` (no transform), and its target."""
    return [F.decode_image(dataset[i][0])[0] for i in range(len(dataset))], dataset.targets.tolist()


@contextmanager
def warnings_logged():
    """The messages the run's logger warns with meanwhile."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    get_logger().addHandler(handler)
    try:
        yield records
    finally:
        get_logger().removeHandler(handler)


@contextmanager
def deadline(seconds: float):
    """Fail instead of hanging (a link loop used to walk forever)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ 2. CIFAR pickles
class CreatesAFile:
    """Unpickling this object opens (creates) ``path``: what a tampered pickle can do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("victim", ["batches.meta", "data_batch_1"])
def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path, protocol, victim):
    root = F.make_fixture("cifar10", tmp_path / "data")
    marker = tmp_path / "created_by_the_pickle"
    path = root / "cifar-10-batches-py" / victim
    with open(path, "rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    entry["extra"] = CreatesAFile(marker)
    path.write_bytes(pickle.dumps(entry, protocol=protocol))
    with pytest.raises(DatasetNotFoundError) as raised:
        get_datasets("cifar10", None, None, task_from_args(Namespace(dataset_name="cifar10", data_root=str(root))))
    assert not marker.exists()
    message = str(raised.value)
    assert str(path) in message and "open" in message and "official archive" in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_as_numpy_1_2_and_protocol_5_write_them_still_load(tmp_path, name):
    root = F.make_fixture(name, tmp_path / "data")
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    files = [folder / f for f in (("data_batch_1", "test_batch") if name == "cifar10" else ("train", "test"))]
    # The official files were pickled by NumPy 1 (numpy.core...); rewrite one file that way
    # (protocol 2 names globals as text lines), one with protocol 5 (out-of-band style buffers).
    with open(files[0], "rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    old_style = pickle.dumps(entry, protocol=2).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in old_style
    files[0].write_bytes(old_style)
    with open(files[1], "rb") as handle:
        files[1].write_bytes(pickle.dumps(pickle.load(handle, encoding="latin1"), protocol=5))
    task = task_from_args(Namespace(dataset_name=name, data_root=str(root)))
    assert list(task.class_names) == [f"thing_{c}" for c in task.train_classes + task.unlabeled_classes]
    train_set, test_set, *_ = get_datasets(name, None, None, task)
    for part in (train_set.labelled_dataset, train_set.unlabelled_dataset, test_set):
        codes, targets = codes_and_targets(part)
        remapped = {c: t for t, c in enumerate(task.train_classes + task.unlabeled_classes)}
        assert [remapped[c] for c in codes] == targets and len(targets) > 0


# ------------------------------------------------------------------ 7. bad images
def write_bomb(path: Path) -> None:
    """A PNG whose header declares 100000 x 100000 pixels (10 gigapixels): a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def spoil_images(root: Path) -> dict[str, Path]:
    """Three images whose header does not open, and one cut short after its header."""
    bad = {"empty": root / "train" / "ant" / "0000.jpg", "header cut": root / "train" / "bee" / "0000.png",
           "bomb": root / "train" / "fox" / "0001.jpg", "cut after header": root / "train" / "cat" / "0000.jpg"}
    bad["empty"].write_bytes(b"")
    bad["header cut"].write_bytes(bad["header cut"].read_bytes()[:12])
    bad["bomb"].unlink()
    bad["bomb"] = bad["bomb"].with_suffix(".png")
    write_bomb(bad["bomb"])
    cut_short(bad["cut after header"])
    return bad


def cut_short(jpeg: Path) -> None:
    """Drop the last 40 bytes of a JPEG: its header still opens, its pixels do not decode."""
    jpeg.write_bytes(jpeg.read_bytes()[:-40])


def test_every_bad_image_is_reported_before_training(tmp_path):
    root = F.write_folder(tmp_path / "data", "train", n_train=3)
    bad = spoil_images(root)
    with pytest.raises(ImageLoadError) as raised:
        folder_loaders(root, "--old_classes", "ant,bee,cat")
    message = str(raised.value)
    assert "3 image files of dataset 'folder' cannot be opened" in message and "--skip_bad_images" in message
    assert all(str(bad[kind]) in message for kind in ("empty", "header cut", "bomb"))
    assert str(bad["cut after header"]) not in message  # its header is intact: found when decoded


def test_with_skip_bad_images_they_are_announced_then_skipped_and_listed(tmp_path):
    root = F.write_folder(tmp_path / "data", "train", n_train=3)
    bad = spoil_images(root)
    skip_log = tmp_path / "skipped_images.txt"
    with warnings_logged() as warnings:
        loaders = folder_loaders(root, "--old_classes", "ant,bee,cat", "--skip_bad_images", skip_log=skip_log)
    assert any("3 image files" in w and str(bad["bomb"]) in w and "--skip_bad_images" in w for w in warnings)
    unlabelled = loaders.unlabelled.dataset
    unlabelled.transform = None
    [unlabelled[i] for i in range(len(unlabelled))]
    labelled = loaders.train.dataset.dataset.labelled_dataset
    labelled.transform = None
    [labelled[i] for i in range(len(labelled))]
    listed = skip_log.read_text()
    assert all(str(path) in listed for path in bad.values()) and count_skipped_images(skip_log) == 4


def test_an_image_cut_short_after_its_header_names_the_file_and_the_flag(tmp_path):
    root = F.write_folder(tmp_path / "data", "train", n_train=3)
    victim = root / "train" / "cat" / "0000.jpg"
    cut_short(victim)
    loaders = folder_loaders(root, "--old_classes", "ant,bee,cat")  # its header opens
    dataset = loaders.unlabelled.dataset
    with pytest.raises(ImageLoadError) as raised:
        [dataset[i] for i in range(len(dataset))]
    assert str(victim) in str(raised.value) and "--skip_bad_images" in str(raised.value)


# ------------------------------------------------------------------ 9. links
def test_link_loops_end_and_every_image_is_found_once_under_its_class(tmp_path):
    root = F.write_folder(tmp_path / "data", "train", n_train=3, n_test=1)
    train = root / "train"
    (train / "ant" / "loop").symlink_to("..")                 # to train/: every class again, as ant
    (train / "bee" / "here").symlink_to(".")                  # two loops: the walk never ended
    (train / "bee" / "sub").mkdir()
    (train / "bee" / "sub" / "back").symlink_to("../..")      # .. a loop through a parent
    (train / "cat" / "dog").symlink_to(train / "dog")         # another class's images
    (train / "eel" / "again.png").symlink_to(train / "eel" / "0001.png")  # one image, two names
    with warnings_logged() as warnings, deadline(20):
        task = task_from_args(folder_args(root, old_classes="ant,bee,cat"))
        train_set, test_set, unlabelled, parts = get_datasets("folder", None, None, task)
    remapped = {c: t for t, c in enumerate(task.train_classes + task.unlabeled_classes)}
    codes, targets = codes_and_targets(unlabelled)
    labelled_codes, labelled_targets = codes_and_targets(parts["train_labelled"])
    assert sorted(codes + labelled_codes) == sorted(c for c in range(6) for _ in range(3))
    assert [remapped[c] for c in codes + labelled_codes] == targets + labelled_targets
    left_out = "\n".join(warnings)
    for link in ("ant/loop", "bee/here", "bee/sub/back", "cat/dog", "eel/again.png"):
        assert str(train / link) in left_out, link


def test_links_to_images_outside_the_root_are_followed(tmp_path):
    root = F.write_folder(tmp_path / "data", "train", n_train=2, n_test=1)
    outside = F.write_folder(tmp_path / "elsewhere", "train", n_train=2, n_test=1) / "train"
    (root / "train" / "dog" / "more").symlink_to(outside / "dog")
    (root / "train" / "eel" / "one.png").symlink_to(outside / "eel" / "0001.png")
    task = task_from_args(folder_args(root, old_classes="ant"))
    unlabelled = get_datasets("folder", None, None, task)[2]
    codes, _ = codes_and_targets(unlabelled)
    # 12 images, one of ant's labelled, and 3 linked in.
    assert codes.count(DOG) == 4 and codes.count(EEL) == 3 and len(unlabelled) == 12 - 1 + 3


# ------------------------------------------------------------------ 10. image modes
def saved(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


MODES = {  # mode: (file, pixels written, the RGB expected)
    "1": ("png", np.array([[0, 1]], dtype=bool), [[0, 0, 0], [255, 255, 255]]),
    "L": ("png", np.array([[7, 200]], dtype=np.uint8), [[7] * 3, [200] * 3]),
    "LA": ("png", np.array([[[7, 0], [200, 255]]], dtype=np.uint8), [[7] * 3, [200] * 3]),
    "RGB": ("png", np.array([[[1, 2, 3], [250, 128, 0]]], dtype=np.uint8), [[1, 2, 3], [250, 128, 0]]),
    "RGBA": ("png", np.array([[[1, 2, 3, 0], [250, 128, 0, 255]]], dtype=np.uint8), [[1, 2, 3], [250, 128, 0]]),
    "CMYK": ("tiff", np.array([[[0, 255, 255, 0], [0, 0, 0, 255]]], dtype=np.uint8), [[255, 0, 0], [0, 0, 0]]),
    "F": ("tiff", np.array([[7.0, 200.0]], dtype=np.float32), [[7] * 3, [200] * 3]),
    "I;16": ("png", np.array([[257 * 7, 65535]], dtype=np.uint16), [[7] * 3, [255] * 3]),
    "I": ("tiff", np.array([[257 * 7, 65535]], dtype=np.int32), [[7] * 3, [255] * 3]),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_becomes_the_rgb_it_shows(tmp_path, mode):
    suffix, pixels, expected = MODES[mode]
    image = Image.fromarray(pixels, mode) if mode in ("LA", "CMYK", "RGBA") else Image.fromarray(pixels)
    path = saved(tmp_path / f"image.{suffix}", image)
    assert Image.open(path).mode == mode
    rgb = load_image(path, "modes")
    assert rgb.mode == "RGB" and np.asarray(rgb).tolist() == [expected]


def test_16_bit_greyscale_keeps_its_contrast(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    png = saved(tmp_path / "ramp.png", Image.fromarray(ramp))                # PIL mode I;16
    pgm = saved(tmp_path / "ramp.pgm", Image.fromarray(ramp))                # PIL mode I
    expected = np.rint(ramp / 257).astype(np.uint8)
    for path in (png, pgm):
        pixels = np.asarray(load_image(path, "16-bit"))
        assert np.array_equal(pixels, np.repeat(expected[..., None], 3, axis=2)), path
        assert (pixels == 255).mean() < 0.01  # it was 99.8 % white
    big = np.array([[0, 100_000, 200_000, -5]], dtype=np.int32)             # beyond 16 bits: by its maximum
    assert np.asarray(load_image(saved(tmp_path / "big.tiff", Image.fromarray(big)), "32-bit"))[0, :, 0].tolist() \
        == [0, 128, 255, 0]


# ------------------------------------------------------------------ 14. BOM and repeated lines
def test_names_files_with_a_byte_order_mark_are_read(tmp_path):
    root = F.write_folder(tmp_path, "train")
    (root / "old.txt").write_text("dog\r\nant\r\n", encoding="utf-8-sig")   # as Windows Notepad saves
    (root / "class_names.txt").write_text("ant\tcarpenter ant\ndog\tdingo\n", encoding="utf-8-sig")
    task = task_from_args(folder_args(root, old_classes=str(root / "old.txt")))
    assert list(task.train_classes) == [DOG, ANT]
    assert list(task.class_names) == ["dingo", "carpenter ant", "bee", "cat", "eel", "fox"]


def dataset_error(root: Path, **flags) -> str:
    with pytest.raises(DatasetNotFoundError) as raised:
        task_from_args(folder_args(root, **flags))
    return str(raised.value)


def test_a_folder_named_on_two_lines_is_refused(tmp_path):
    root = F.write_folder(tmp_path, "train")
    names = root / "class_names.txt"
    names.write_text("ant\tant\n\ndog\tdingo\nant\tred ant\n")
    message = dataset_error(root, old_classes="ant")
    assert str(names) in message and "'ant' on line 1 and on line 4" in message
    names.unlink()
    (root / "old.txt").write_text("ant\nbee\nant\n")
    message = dataset_error(root, old_classes=str(root / "old.txt"))
    assert str(root / "old.txt") in message and "'ant' twice (line 1 and line 3)" in message


# ------------------------------------------------------------------ 15. not UTF-8
def test_text_files_that_are_not_utf8_are_refused_naming_the_file(tmp_path):
    root = F.write_folder(tmp_path, "train")
    names = root / "class_names.txt"
    names.write_bytes("ant\tant\ndog\tcaf\xe9 dog\n".encode("latin-1"))
    message = dataset_error(root, old_classes="ant")
    assert str(names) in message and "not UTF-8" in message and "line 2" in message
    names.unlink()
    (root / "old.txt").write_bytes("ant\ncaf\xe9\n".encode("latin-1"))
    message = dataset_error(root, old_classes=str(root / "old.txt"))
    assert str(root / "old.txt") in message and "not UTF-8" in message
    # The reader other inputs can share (a list of names, say): an InputError by default.
    from data.data_utils import read_utf8_lines

    with pytest.raises(InputError, match=rf"{root / 'old.txt'} is not UTF-8 text \(line 2 holds the byte 0xe9"):
        read_utf8_lines(root / "old.txt")


def test_folder_and_file_names_that_are_not_utf8(tmp_path):
    classes = ("ant", LATIN1_NAME, "cat", "dog")
    root = F.write_folder(tmp_path / "data", "train", n_old=2, n_train=2, n_test=1, classes=classes)
    image = root / "train" / LATIN1_NAME / "0000.jpg"
    image.rename(image.with_name(os.fsdecode(b"\xe9t\xe9.jpg")))
    broken = root / "train" / LATIN1_NAME / os.fsdecode(b"cass\xe9.jpg")
    broken.write_bytes(b"")
    task = task_from_args(folder_args(root, old_classes=f"ant,{LATIN1_NAME}"))
    assert list(task.class_names) == ["ant", LATIN1_NAME, "cat", "dog"]
    train_set, test_set, unlabelled, parts = get_datasets("folder", None, None, task)
    assert unlabelled.raw.unreadable == (str(broken),)
    raw = unlabelled.raw.subset(np.flatnonzero([path != str(broken) for path in unlabelled.raw.images]))
    for part in (GCDDataset(raw, np.arange(len(raw)), {c: c for c in range(4)}, None), test_set):
        codes, targets = codes_and_targets(part)  # folders sorted: class id = code = target
        assert codes == targets and len(codes) > 0
    # The image cache keys and stores such paths, and the broken file's error, which can be
    # skipped and counted.
    dataset = GCDDataset(unlabelled.raw, np.arange(len(unlabelled.raw)), {c: c for c in range(4)}, None)
    use_image_cache(str(tmp_path / "cache"), {"train": [dataset]}, resize_step(32), DistInfo())
    assert dataset.raw.image(0).size == (36, 36)
    dataset.skip_log = tmp_path / "skipped.txt"
    [dataset[i] for i in range(len(dataset))]
    assert str(broken) in (tmp_path / "skipped.txt").read_text(errors="surrogateescape")
    assert count_skipped_images(tmp_path / "skipped.txt") == 1


# ------------------------------------------------------------------ 17. the image cache
def in_memory_split(count: int = 8) -> RawSplit:
    pixels = np.stack([F.encode_image(i, i, 40) for i in range(count)])
    return RawSplit("memory", pixels, np.zeros(count, dtype=np.int64))


def build(raw: RawSplit, folder: Path, workers: int = 0) -> GCDDataset:
    dataset = GCDDataset(raw, np.arange(len(raw)), {0: 0}, None)
    use_image_cache(str(folder), {"train": [dataset]}, resize_step(32), DistInfo(), workers)
    return dataset


def test_a_cache_folder_that_cannot_be_created_names_the_flag(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ImageCacheError, match=r"--image_cache .*a_file/cache: cannot create or write"):
        build(in_memory_split(), tmp_path / "a_file" / "cache")


def in_child(work, as_nobody: bool = False) -> str:
    """What ``work()`` returns, or the error it raises ("Type: message"), run in a forked child
    (as user nobody if asked and root): a signal or a lost privilege cannot touch the tests."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            if as_nobody and os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                result = str(work())
            except BaseException as error:  # reported to the parent
                result = f"{type(error).__name__}: {error}"
            os.write(write, result.encode("utf-8", "backslashreplace")[:4000])
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        result = pipe.read()
    return result if not os.WIFSIGNALED(status) else f"killed by signal {os.WTERMSIG(status)}"


def test_a_read_only_cache_folder_names_the_flag(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    result = in_child(lambda: build(in_memory_split(), folder), as_nobody=True)
    assert result.startswith("ImageCacheError: --image_cache") and "cannot create or write" in result, result


class SignalsDuringTheBuild(RawSplit):
    """An in-memory split whose image 3, when the cache build reads it, sends ``signum`` to the
    building process (from a loader worker, too): a Ctrl-C or a kill in the middle of a build."""

    def __init__(self, raw: RawSplit, signum: int):
        super().__init__(raw.dataset_name, raw.images, raw.targets)
        self.signum, self.builder = signum, os.getpid()

    def image(self, index: int) -> Image.Image:
        if index == 3:
            os.kill(self.builder, self.signum)
        return super().image(index)


@pytest.mark.parametrize("signum, workers", [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGTERM, 2)])
def test_a_signal_during_the_build_stops_it_cleanly(tmp_path, signum, workers):
    raw, folder = in_memory_split(), tmp_path / "cache"

    def interrupted_build() -> str:
        handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
        try:
            build(SignalsDuringTheBuild(raw, signum), folder, workers)
        finally:
            assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers, "not restored"
        return "finished"

    result = in_child(interrupted_build)
    assert result.startswith("ImageCacheError: --image_cache"), result
    assert f"stopped ({signal.Signals(signum).name})" in result and "Run the same command again" in result
    assert "\n" not in result
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]      # no .partial-* left
    dataset = build(raw, folder)                                     # the next run builds it
    assert CacheFiles.of(folder, raw, "train", resize_step(32)).trusted()
    assert F.decode_image(dataset.raw.image(5)) == (5, 5)


def test_a_name_that_is_not_utf8_reaches_the_log_as_escapes(tmp_path, capfd):
    from util.logging_utils import setup_logging

    name = os.fsdecode(b"caf\xe9.png")  # as Python gives a latin-1 file name: a surrogate escape
    setup_logging(tmp_path / "log.txt").warning("cannot read %s", name)
    setup_logging(None)  # closes the file handler
    console = capfd.readouterr()
    for text in (console.out, (tmp_path / "log.txt").read_text(encoding="utf-8")):
        assert "cannot read caf\\xe9.png" in text
    assert "Logging error" not in console.err
