"""Decode and resize once: the image cache behind ``--image_cache DIR``.

    python train.py --dataset_name cub --image_cache /scratch/get_image_cache

Both transforms start with the same deterministic steps: decode, convert to RGB, resize the
shorter side to int(224 / 0.875) = 256 px (bicubic). Only what follows is random (crop,
flip, jitter) or cheap (ToTensor, Normalize). The cache stores the output of those first
steps, so every epoch starts from the resized pixels instead of the JPEG.

One cache per split of the dataset as read from disk (``RawSplit``): the training split
serves the training set and the evaluation of the unlabelled training images, the test split
the test evaluation. Each cache is two files in DIR:

    <dataset>-<train|test>-<key>.u8          every resized image, uint8 RGB rows, back to back
    <dataset>-<train|test>-<key>.index.npz   offset and (height, width) of each image, the
                                             message of each unreadable image, the key

The key hashes what decides the pixels: this format's version, the dataset and split, every
image's absolute path (so the root and the file list; images held in memory, CIFAR and
digits, by their content) and the resize (size, interpolation). Another key is another
file, never a wrong image. A dataset changed in place under the same paths is not noticed:
delete its cache files.

A build writes both files under temporary names, syncs them and renames them into place,
the index last; only an index whose key, image count and data size match is trusted, so a
build killed at any moment leaves nothing that is read, and the next run builds again.
SIGINT (Ctrl-C) or SIGTERM during a build stops it at once: its temporary files are removed
and an ImageCacheError says so (the caches of splits already built are kept). A folder that
cannot be created or written is an ImageCacheError naming the flag too.
Reading from the cache gives the very PIL image the uncached path has after its resize, so
the random steps draw the same numbers and give bit-identical views (tests/test_image_cache.py).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from data.data_utils import GCDDataset, RawSplit, image_header_size
from errors import ImageCacheError, ImageLoadError
from util.dist import DistInfo
from util.logging_utils import get_logger

FORMAT_VERSION = 1
LOCK_FILE = ".lock"
WAIT_POLL_S = 2.0


# ----------------------------------------------------------------- reading a built cache
class ImageCache:
    """The resized images of one RawSplit, read from the memory-mapped data file.

    ``image(i)`` is the RGB PIL image that ``resize(raw.image(i))`` gives, or the
    ImageLoadError that reading image i gave when the cache was built.
    """

    def __init__(self, files: "CacheFiles"):
        self.data_path = files.data
        with np.load(files.index, allow_pickle=False) as index:
            self.offsets = index["offsets"]            # int64 [N], into the data file
            self.shapes = index["shapes"]              # int32 [N, 2], (height, width)
            self.errors = dict(zip(index["error_positions"].tolist(), index["error_messages"].tolist()))
            self.nbytes = json.loads(str(index["meta"]))["nbytes"]
        self._pixels: np.ndarray | None = None        # opened on first use, in each process

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        # A loader worker started by spawn/forkserver maps the file itself instead of
        # receiving a pickled copy of every pixel.
        return {**self.__dict__, "_pixels": None}

    def image(self, index: int) -> Image.Image:
        """Image ``index`` after the resize, as an RGB PIL image [H, W]."""
        message = self.errors.get(index)
        if message is not None:
            raise ImageLoadError(f"{message} (recorded when the image cache {self.data_path} was "
                                 "built: once the file is fixed, delete that cache file)")
        if self._pixels is None:
            self._pixels = (np.memmap(self.data_path, dtype=np.uint8, mode="r") if self.nbytes
                            else np.empty(0, dtype=np.uint8))
        height, width = (int(v) for v in self.shapes[index])
        start = int(self.offsets[index])
        return Image.fromarray(self._pixels[start:start + height * width * 3].reshape(height, width, 3))


class CachedSplit(RawSplit):
    """A RawSplit whose ``image(i)`` comes, already resized, from an ImageCache."""

    def __init__(self, raw: RawSplit, cache: ImageCache):
        super().__init__(raw.dataset_name, raw.images, raw.targets)
        self.cache = cache

    def image(self, index: int) -> Image.Image:
        return self.cache.image(index)


# ------------------------------------------------------------------ where a cache lives
@dataclass(frozen=True)
class CacheFiles:
    """The two files of the cache of one split, and the key they must carry."""

    data: Path
    index: Path
    key: str
    count: int
    split: str

    @classmethod
    def of(cls, folder: Path, raw: RawSplit, split: str, resize: transforms.Resize) -> "CacheFiles":
        key = cache_key(raw, split, resize)
        stem = folder / f"{raw.dataset_name}-{split}-{key[:16]}"
        return cls(stem.with_suffix(".u8"), stem.with_suffix(".index.npz"), key, len(raw), split)

    def trusted(self) -> bool:
        """True when a complete cache of this key is in place (a killed build leaves none)."""
        try:
            with np.load(self.index, allow_pickle=False) as index:
                meta = json.loads(str(index["meta"]))
            return (meta["version"] == FORMAT_VERSION and meta["key"] == self.key
                    and meta["count"] == self.count and self.data.stat().st_size == meta["nbytes"])
        except (OSError, ValueError, KeyError):
            return False


def cache_key(raw: RawSplit, split: str, resize: transforms.Resize) -> str:
    """sha256 (hex) of everything that decides the cached pixels of ``raw``."""
    digest = hashlib.sha256()
    settings = [FORMAT_VERSION, raw.dataset_name, split, len(raw), repr(resize.size),
                resize.interpolation.value, repr(resize.max_size), repr(resize.antialias)]
    digest.update(json.dumps(settings).encode())
    if isinstance(raw.images, np.ndarray):
        pixels = np.ascontiguousarray(raw.images)
        digest.update(f"{pixels.dtype.str} {pixels.shape}".encode())
        digest.update(memoryview(pixels).cast("B"))
    else:
        # fsencode: the file system's bytes, also of names that are not UTF-8.
        digest.update(b"\n".join(os.fsencode(os.path.abspath(path)) for path in raw.images))
    return digest.hexdigest()


# ------------------------------------------------------------------------- the hook
def use_image_cache(cache_dir: str, splits: dict[str, Sequence[GCDDataset]], resize: transforms.Resize,
                    info: DistInfo, num_workers: int = 0, progress: bool = False) -> None:
    """Let the datasets read their images resized from the cache in ``cache_dir`` (--image_cache);
    a missing cache is built with ``num_workers`` loader processes.

    splits: {"train": [...], "test": [...]}, the datasets of one split sharing its RawSplit;
    ``resize`` is the first step of their transforms, which then leaves the cached images as they are.
    Missing caches are built first, by local rank 0 of each machine under a lock on the
    folder (concurrent runs sharing the folder build each cache once); the other processes
    wait until the caches are in place. No barrier: building ImageNet takes longer than a
    collective's timeout.
    """
    folder = Path(cache_dir).expanduser()
    raws = {split: datasets[0].raw for split, datasets in splits.items()}
    files = {split: CacheFiles.of(folder, raw, split, resize) for split, raw in raws.items()}
    if info.local_rank == 0:
        if not all(f.trusted() for f in files.values()):
            with _as_cache_errors(folder):
                folder.mkdir(parents=True, exist_ok=True)
                with _locked(folder):
                    missing = [split for split in raws if not files[split].trusted()]  # built meanwhile?
                    if missing:
                        build_caches([(raws[s], files[s]) for s in missing], resize, folder,
                                     num_workers, progress)
    else:
        while not all(f.trusted() for f in files.values()):
            time.sleep(WAIT_POLL_S)
    for split, datasets in splits.items():
        cache = ImageCache(files[split])
        for dataset in datasets:
            dataset.raw = CachedSplit(dataset.raw, cache)
        get_logger().info("image cache: %s %s images from %s", raws[split].dataset_name, split,
                          files[split].data)


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived during a build (raised by ``_stop_on_signals``'s handler)."""


@contextmanager
def _as_cache_errors(folder: Path) -> Iterator[None]:
    """What stops a build in ``folder`` as an ImageCacheError naming the flag, which train.py
    prints without a traceback: a stop request (SIGINT/SIGTERM; ``_build`` has removed its
    temporary files by then) or a folder that cannot be created or written."""
    try:
        with _stop_on_signals():
            yield
    except _Stopped as stop:
        raise ImageCacheError(f"--image_cache {folder}: stopped ({stop}) before the image cache was "
                              "finished; its temporary files were removed (the caches of splits "
                              "already built are kept). Run the same command again to build the "
                              "rest.") from None
    except ImageCacheError:
        raise
    except OSError as error:
        raise ImageCacheError(f"--image_cache {folder}: cannot create or write the image cache there "
                              f"({error}). Give a folder you can write to, or leave the flag out "
                              "(images are then decoded every epoch).") from error


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop a build at once by raising _Stopped where it is. The build comes
    before the run's own StopSignal (util/signals.py) is installed: without this, Ctrl-C gives a
    KeyboardInterrupt traceback and SIGTERM kills the process before its temporary files are
    removed. A second signal during the clean-up is ignored (the clean-up is two unlinks)."""
    previous = {}

    def stop(signum, frame):
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        raise _Stopped(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker_signals(_: int) -> None:
    """A build's loader workers leave SIGINT and SIGTERM to the builder, which shuts them down
    when it stops. (Ctrl-C and kill of a process group reach them too; a worker dying of it
    made the loader print a traceback while the builder was cleaning up.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the folder's build lock (released by the system if the process dies)."""
    with open(folder / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            get_logger().info("image cache: another process is building in %s, waiting", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------- building
def build_caches(todo: list[tuple[RawSplit, CacheFiles]], resize: transforms.Resize, folder: Path,
                 workers: int, progress: bool) -> None:
    """Size, announce and build the caches of ``todo``; ImageCacheError if the disk lacks room.

    Call with the folder's lock held: any temporary file found is from a killed build.
    """
    log = get_logger()
    for _, files in todo:
        for path in files.data.parent.glob(f"{files.data.stem}.*.partial-*"):
            path.unlink(missing_ok=True)
    log.info("image cache: reading the sizes of %d images", sum(files.count for _, files in todo))
    sizes = [predicted_bytes(raw, resize, workers, progress) for raw, _ in todo]
    needed = sum(sizes) + sum(4096 + 24 * files.count for _, files in todo)  # + the indexes
    free = shutil.disk_usage(folder).free
    for (raw, files), size in zip(todo, sizes):
        log.info("image cache: %s %s, %d images, %s -> %s", raw.dataset_name, files.split,
                 files.count, _gigabytes(size), files.data)
    log.info("image cache: %s to write in %s (%s free); built once, reused by later runs",
             _gigabytes(needed), folder, _gigabytes(free))
    if needed > free:
        raise ImageCacheError(
            f"--image_cache {folder}: the image cache needs {_gigabytes(needed)} but that disk has "
            f"{_gigabytes(free)} free. Free some space, give --image_cache a folder on a disk with "
            "room, or leave the flag out (images are then decoded every epoch).")
    for raw, files in todo:
        start = time.perf_counter()
        _build(raw, files, resize, workers, progress)
        log.info("image cache: %s built in %.0f s", files.data, time.perf_counter() - start)


def predicted_bytes(raw: RawSplit, resize: transforms.Resize, workers: int, progress: bool) -> int:
    """Bytes of ``raw``'s cached pixels, from the image sizes alone (files: their headers).

    Unreadable images count as none (they are stored as their error).
    """
    if isinstance(raw.images, np.ndarray):
        height, width = raw.images.shape[1:3]
        return len(raw) * _resized_bytes((width, height), resize)
    sizes = _in_order(partial(_header_size, raw.images), len(raw), workers)
    return sum(_resized_bytes(size, resize) for size in
               tqdm(sizes, total=len(raw), desc="image sizes", unit="img", disable=not progress,
                    leave=False))


def _header_size(paths: Sequence[str], index: int) -> tuple[int, int] | None:
    return image_header_size(paths[index])


def _resized_bytes(size: tuple[int, int] | None, resize: transforms.Resize) -> int:
    """uint8 RGB bytes of an image of ``size`` (width, height) after ``resize_step``'s resize
    (the short side to ``resize.size``, the aspect ratio kept, as torchvision rounds it); 0 for None."""
    if size is None:
        return 0
    short, long = sorted(size)
    requested = resize.size if isinstance(resize.size, int) else resize.size[0]
    return requested * int(requested * long / short) * 3


def _build(raw: RawSplit, files: CacheFiles, resize: transforms.Resize, workers: int,
           progress: bool) -> None:
    """Decode and resize every image of ``raw`` into ``files``, atomically (index last)."""
    partial_data, partial_index = _partials(files)
    files.index.unlink(missing_ok=True)  # an index must never describe another data file
    offsets = np.zeros(len(raw), dtype=np.int64)
    shapes = np.zeros((len(raw), 2), dtype=np.int32)
    errors: dict[int, str] = {}
    try:
        with open(partial_data, "wb") as out:
            position = 0
            results = _in_order(partial(_resized_pixels, raw, resize), len(raw), workers)
            for index, result in enumerate(tqdm(results, total=len(raw), unit="img", disable=not progress,
                                                desc=f"image cache {raw.dataset_name} {files.split}")):
                if isinstance(result, str):
                    errors[index] = result
                    continue
                offsets[index], shapes[index] = position, result.shape[:2]
                out.write(memoryview(result).cast("B"))
                position += result.nbytes
            out.flush()
            os.fsync(out.fileno())
        meta = {"version": FORMAT_VERSION, "key": files.key, "count": len(raw), "nbytes": position,
                "dataset": raw.dataset_name, "resize": repr(resize)}
        with open(partial_index, "wb") as out:
            np.savez(out, offsets=offsets, shapes=shapes,
                     error_positions=np.array(sorted(errors), dtype=np.int64),
                     error_messages=np.array([errors[i] for i in sorted(errors)], dtype=str),
                     meta=np.array(json.dumps(meta)))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial_data, files.data)
        os.replace(partial_index, files.index)  # from here on the cache is trusted
        _fsync_folder(files.data.parent)
    except BaseException as error:
        for path in (partial_data, partial_index):
            path.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise ImageCacheError(f"--image_cache {files.data.parent}: the disk filled up while "
                                  f"building {files.data.name}; nothing was kept. Free some space "
                                  "or leave the flag out.") from error
        raise


def _resized_pixels(raw: RawSplit, resize: Callable, index: int) -> np.ndarray | str:
    """uint8 [H, W, 3] of image ``index`` after ``resize``, or the message of its ImageLoadError."""
    try:
        image = raw.image(index)
    except ImageLoadError as error:
        return str(error)
    return np.asarray(resize(image), dtype=np.uint8)


def _partials(files: CacheFiles) -> tuple[Path, Path]:
    """Where this process writes before renaming into place: names of its own, so that even
    two builders the lock fails to keep apart (some network file systems) never share a file;
    they write the same bytes, so whichever renames last leaves a consistent pair."""
    suffix = f".partial-{socket.gethostname()}-{os.getpid()}"
    return files.data.with_name(files.data.name + suffix), files.index.with_name(files.index.name + suffix)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Calls(Dataset):
    """``fn(i)`` for i in range(n): lets a DataLoader run ``fn`` in worker processes."""

    def __init__(self, fn: Callable, n: int):
        self.fn, self.n = fn, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.fn(index)


def _as_is(item):
    return item


def _in_order(fn: Callable, n: int, workers: int) -> Iterator:
    """fn(0), ..., fn(n-1), in order, computed by ``workers`` processes (0: this one)."""
    return iter(DataLoader(_Calls(fn, n), batch_size=None, num_workers=workers, collate_fn=_as_is,
                           worker_init_fn=_worker_signals if workers else None))


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
