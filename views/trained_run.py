"""A trained run, put to use (predict.py, report.py --gallery): its stage-2 model rebuilt from a
checkpoint with each head's clusters matched to the old classes on the run's labelled images
(``load_run``), the clusters of any images (``predict_clusters``), names for new clusters from
candidate words (``propose_names``: the TES output against CLIP's text embeddings), and the
gallery of a run's own unlabelled training images (``gallery_of_run``).

A weights file is only loaded when the user names it: a run trained with ``--pretrained FILE``
needs ``--pretrained`` again (open_clip tags such as ``openai`` are followed). An image that
cannot be read gives a blank stand-in marked UNREADABLE, and the caller decides what it means.
"""
from __future__ import annotations

import shlex
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from backbone import build_clip, class_text_embeddings, get_tokenizer, is_local_weights
from config import vision_image_size
from data.augmentations import get_transforms
from data.data_utils import NO_LABEL, RawSplit, load_image, read_utf8_lines, skip_bad_images, skipped_images
from data.get_datasets import dataset_folder, get_datasets
from data.task import Task, task_from_args
from errors import CheckpointError, ImageLoadError, InputError
from evaluation.accuracy import cluster_to_class
from evaluation.predict import by_head, frozen_batches, gather_outputs, head_clusters
from model import GETModel
from params import device_problem, resolve_device
from runs.checkpoints import load_stage2_checkpoint, model_from_checkpoint
from runs.run import SKIPPED_IMAGES
from util.dist import DistInfo
from util.logging_utils import get_logger
from views import gallery
from vocabulary import HEADS

# The target of an image that could not be read: it gets no row / no thumbnail.
UNREADABLE = -2
BATCH_SIZE = 256  # images per forward pass (predict.py's default)


class ImageSource(Dataset):
    """``size`` images, image i opened by ``read(i)``, with the test transform: item (image
    [3, H, W], NO_LABEL, i); an unreadable one gives a blank stand-in image and the target
    UNREADABLE.

    The main process decides what an unreadable image means (``refuse_unreadable``,
    ``drop_unreadable``): an error raised in a loader's worker process would reach the user
    wrapped in that process's traceback. ``read`` is a partial of a module function, which
    worker processes can receive."""

    def __init__(self, read: Callable[[int], Image.Image], size: int, transform):
        self.read, self.size, self.transform = read, size, transform

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        try:
            return self.transform(self.read(index)), NO_LABEL, index
        except ImageLoadError:
            return self.transform(Image.new("RGB", (1, 1))), UNREADABLE, index


def read_file(paths: list[Path], index: int) -> Image.Image:
    """Image ``index`` of the files of --images."""
    return load_image(paths[index], "predict.py --images")


def read_split(raw: RawSplit, positions: np.ndarray, index: int) -> Image.Image:
    """Image ``index`` of the samples at ``positions`` of a dataset split."""
    return raw.image(int(positions[index]))


@dataclass
class TrainedRun:
    """A run's stage-2 model with what its predictions need: the run's flags and task, the
    test transform, each head's clusters matched to the old classes, and the loader options."""
    checkpoint: str
    args: Namespace
    task: Task
    model: GETModel
    transform: Callable
    matches: dict[str, dict[int, int]]
    loader_opts: dict

    def names(self, head: str) -> dict[int, str]:
        """Name of every cluster of ``head``: its old class's, else new_<id>."""
        return cluster_names(self.matches[head], self.task.class_names, self.task.num_classes)

    def loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, **self.loader_opts)


def load_run(opts: Namespace, device: str, progress: bool, flag: str = "--checkpoint") -> TrainedRun:
    """The model of ``opts.checkpoint``, its clusters matched to the old classes on the run's
    labelled images. ``opts``: predict.py's options (the checkpoint, the CLIP weights, the
    dataset's root, the loader's, --skip_bad_images); ``flag`` names the checkpoint in errors."""
    log = get_logger()
    ckpt = read_stage2_checkpoint(opts.checkpoint, flag)
    check_pretrained(ckpt["args"], opts, flag)
    args = run_args(ckpt, opts, device)
    task = run_task(args, ckpt, opts.checkpoint, flag)
    _, test_tf = get_transforms(image_size=vision_image_size(args.clip_model), normalization=args.normalization)
    labelled = get_datasets(task.dataset_name, test_tf, test_tf, task)[3]["train_labelled"]
    loader_opts = dict(batch_size=opts.batch_size, num_workers=opts.num_workers,
                       pin_memory=device.startswith("cuda"))
    model = model_from_checkpoint(build_clip(args, device), ckpt, opts.checkpoint, args.amp).eval()
    log.info("matching clusters to the %d old classes on %d labelled images of %s", task.num_labeled_classes,
             len(labelled), task.dataset_name)
    matches = match_on_labelled(model, DataLoader(labelled, **loader_opts), device, progress, opts.skip_bad_images)
    return TrainedRun(opts.checkpoint, args, task, model, test_tf, matches, loader_opts)


def propose_names(run: TrainedRun, pred: dict[str, np.ndarray], candidates: list[str],
                  template: str | None) -> dict[int, tuple[str, float]]:
    """{new fused cluster: (closest candidate, cosine)} of the clusters in ``pred`` (with 'tes')."""
    text = class_text_embeddings(run.model.clip, get_tokenizer(run.args.clip_model), candidates,
                                 template or run.args.prompt_template).cpu()
    new_clusters = sorted(set(pred["fused"].tolist()) - set(run.matches["fused"]))
    return name_by_candidates(pred["tes"], pred["fused"], new_clusters, text, candidates)


def write_gallery(folder: Path, flag: str, run: TrainedRun, pred: dict[str, np.ndarray],
                  proposed: dict[int, tuple[str, float]], images: gallery.Images,
                  unreadable: list[tuple[str, str]], title: str, per_cluster: int) -> Path:
    """The gallery of the fused clusters of ``pred`` (``images`` in its order); returns index.html."""
    names = run.names("fused")
    clusters = {c: gallery.Cluster(c, names[c], "old" if c in run.matches["fused"] else "new", *proposed.get(c, ()))
                for c in range(run.task.num_classes)}
    started = time.perf_counter()
    page = gallery.write(folder, gallery.Gallery(
        title, clusters, pred["fused"], pred["fused_prob"], images, f"fused clusters of {run.checkpoint}",
        unreadable, per_cluster), flag)
    get_logger().info("wrote the gallery of %d images in %d clusters in %.1f s: %s (open it in a web browser)",
                      len(pred["fused"]), len(set(pred["fused"].tolist())), time.perf_counter() - started,
                      page.resolve())
    return page


def open_file(paths: list[Path], index: int) -> Image.Image:
    """Image ``index`` of ``paths`` for its thumbnail."""
    return gallery.open_image(paths[index])


def gallery_of_run(checkpoint: str, folder: Path, flag: str, per_cluster: int = gallery.PER_CLUSTER,
                   name_candidates: str | None = None, pretrained: str | None = None, data_root: str | None = None,
                   device: str = "auto", progress: bool = False) -> Path:
    """The gallery of a run's unlabelled training images (report.py --gallery), made as
    ``main`` makes one for a folder: the same model, matching and names. ``flag`` names
    ``folder`` in errors. An image that cannot be read is left out, and listed on the page and
    in the log; so is an unreadable labelled image (replaced by the next, as training does)."""
    # The options load_run reads, as predict.py's defaults give them; the images are the run's.
    opts = Namespace(checkpoint=checkpoint, pretrained=pretrained, clip_cache_dir=None, data_root=data_root,
                     amp=None, batch_size=BATCH_SIZE, num_workers=0, skip_bad_images=True)
    resolved = resolve_device(device)
    problem = ((gallery.folder_problem(folder, flag) if per_cluster >= 1
                else f"--gallery_per_cluster must be >= 1; got {per_cluster}") or device_problem(resolved))
    if problem:
        raise InputError(problem)
    candidates = read_candidates(name_candidates) if name_candidates else None
    run = load_run(opts, resolved, progress, "--gallery")

    root = dataset_folder(run.task.dataset_name, run.task.data_root)
    if root is not None and (problem := gallery.inside_problem(folder, root, flag, "the run's dataset folder")):
        raise InputError(problem)
    split = get_datasets(run.task.dataset_name, None, None, run.task)[2]  # the unlabelled training images
    if not len(split):
        raise InputError(f"--gallery {checkpoint}: the run's dataset has no unlabelled training image to show")
    read = partial(read_split, split.raw, split.uq_idxs)
    get_logger().info("predicting the %d unlabelled training images of %s", len(split), run.task.dataset_name)
    pred = predict_clusters(run.model, run.loader(ImageSource(read, len(split), run.transform)), resolved, progress,
                            "unlabelled", with_tes=candidates is not None)
    labels = split_labels(split.raw, split.uq_idxs, split.targets, run.task, root)
    kept, pred, unreadable = drop_unreadable(labels, read, pred, "left out of the gallery",
                                             f"the unlabelled training images of {checkpoint}")
    proposed = propose_names(run, pred, candidates, None) if candidates else {}
    names = {**run.names("fused"), **{cluster: name for cluster, (name, _) in proposed.items()}}
    get_logger().info("clusters of the %d images (fused):\n%s", len(kept), cluster_summary(
        pred["fused"], names, run.matches["fused"], {cluster: sim for cluster, (_, sim) in proposed.items()}))
    positions = split.uq_idxs[kept]
    if isinstance(split.raw.images, np.ndarray):  # held in memory: no file to link to
        images = gallery.Images([labels[i] for i in kept], partial(read_split, split.raw, positions))
    else:
        files = [Path(split.raw.images[i]) for i in positions]
        images = gallery.Images([labels[i] for i in kept], partial(open_file, files), files)
    return write_gallery(folder, flag, run, pred, proposed, images, unreadable,
                         f"Clusters of the unlabelled training images of {run.task.dataset_name}", per_cluster)


def split_labels(raw: RawSplit, positions: np.ndarray, targets: np.ndarray, task: Task,
                 root: Path | None) -> list[str]:
    """What the gallery shows for each image of a split: its path below the dataset's root; an
    image held in memory has none, so ``#<position in the training set>`` and, where known, its
    class ("#17 seven"), which lets the eye check the clusters."""
    if isinstance(raw.images, np.ndarray):
        return [f"#{int(i)}" + (f" {task.class_names[t]}" if t != NO_LABEL else "")
                for i, t in zip(positions, targets.tolist())]
    paths = [Path(raw.images[int(i)]) for i in positions]
    return [path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else str(path)
            for path in paths]


def check_pretrained(run_flags: dict, opts: Namespace, flag: str = "--checkpoint") -> None:
    """A weights file that only the checkpoint names is not loaded: the checkpoint may come from
    elsewhere, and its path may now hold anything. The user names the file (tags are followed)."""
    recorded = run_flags.get("pretrained")
    if opts.pretrained is None and is_local_weights(recorded, run_flags.get("clip_model", "")):
        raise InputError(f"{flag} {opts.checkpoint} was trained with --pretrained {recorded}; pass "
                         f"--pretrained {shlex.quote(str(recorded))} (or another copy of those weights) to use "
                         "it. A weights file named only inside a checkpoint is never loaded")


def match_on_labelled(model: GETModel, loader: DataLoader, device: str, progress: bool,
                      skip_bad: bool) -> dict[str, dict[int, int]]:
    """{head: {cluster: old class}} on the run's labelled images. With ``skip_bad`` an unreadable
    one is replaced by the next, as in training, and listed in the log."""
    with tempfile.TemporaryDirectory() as scratch:  # worker processes record skipped images in a file
        skip_log = Path(scratch) / SKIPPED_IMAGES
        if skip_bad:
            skip_bad_images([loader.dataset], skip_log)
        on_labelled = predict_clusters(model, loader, device, progress, "labelled")  # data/ names the flag
        skipped = skipped_images(skip_log)
    for line in skipped:
        get_logger().warning("replaced by the next labelled image (--skip_bad_images): %s", line)
    return {head: match_old_classes(on_labelled[head], on_labelled["target"]) for head in HEADS}


def refuse_unreadable(paths: list[Path], batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``batch`` of ImageFiles(paths), or the error for its first unreadable file."""
    _, targets, indices = batch
    unreadable = indices[targets == UNREADABLE]
    if len(unreadable):
        index = int(unreadable[0])
        why = unreadable_reason(partial(read_file, paths), index)
        raise ImageLoadError(f"--images: cannot read {paths[index]} ({why}). "
                             "Replace or remove the file, or pass --skip_bad_images to leave it out of the CSV")
    return batch


def unreadable_reason(read: Callable[[int], Image.Image], index: int) -> str:
    """Why image ``index`` cannot be read, asked again here (the worker that failed cannot say)."""
    try:
        read(index)
    except ImageLoadError as error:
        return str(error.__cause__ or error)
    return "it could not be read a moment ago"


def drop_unreadable(labels: list[str], read: Callable[[int], Image.Image], pred: dict[str, np.ndarray],
                    what: str, source: str) -> tuple[list[int], dict[str, np.ndarray], list[tuple[str, str]]]:
    """(the positions of the images that could be read, their predictions, (label, why) of the
    others), each of the others named in the log with ``what`` happened to it. ``source`` names
    the images in the error when none can be read."""
    readable = pred["target"] != UNREADABLE
    unreadable = [(labels[i], unreadable_reason(read, i)) for i in np.flatnonzero(~readable)]
    for label, why in unreadable:
        get_logger().warning("%s: %s (%s)", what, label, why)
    if not readable.any():
        raise ImageLoadError(f"{source}: none of the {len(labels)} images could be read")
    return np.flatnonzero(readable).tolist(), {key: value[readable] for key, value in pred.items()}, unreadable


def read_candidates(path: str) -> list[str]:
    """The distinct non-blank lines of ``path``, in order."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--name_candidates {path}: no such file")
    lines = read_utf8_lines(file, lambda problem: InputError(f"--name_candidates {problem}"))
    names = list(dict.fromkeys(line.strip() for line in lines))
    names = [name for name in names if name]
    if not names:
        raise InputError(f"--name_candidates {path} holds no name (one candidate name per line)")
    return names


def read_stage2_checkpoint(path: str, flag: str = "--checkpoint") -> dict:
    ckpt = load_stage2_checkpoint(path, flag)
    if not isinstance(ckpt.get("args"), dict):
        raise CheckpointError(f"{flag} {path} does not carry the flags of its run ('args')")
    branches = ckpt["meta"].get("branches", "both")
    if branches != "both":  # predictions, names and the gallery are GET's fused clusters
        raise CheckpointError(f"{flag} {path} is a --branches {branches} run (an ablation): predictions and "
                              "galleries are made from GET's two branches. Its accuracy: train.py --stage eval "
                              f"--eval_checkpoint {path}")
    return ckpt


def run_args(ckpt: dict, opts: Namespace, device: str) -> Namespace:
    """The run's flags, with this script's overrides."""
    overrides = {key: getattr(opts, key) for key in ("pretrained", "clip_cache_dir", "data_root")
                 if getattr(opts, key) is not None}
    amp = device.startswith("cuda") if opts.amp is None else opts.amp
    return Namespace(**{**ckpt["args"], **overrides, "device": device, "amp": amp, "download": False})


def run_task(args: Namespace, ckpt: dict, path: str, flag: str = "--checkpoint") -> Task:
    """The run's task, with the checkpoint's K, checked against the checkpoint's split."""
    task = task_from_args(args)
    meta = ckpt["meta"]
    if task.num_labeled_classes != meta["num_old"] or (not task.k_pending and task.num_classes != meta["num_classes"]):
        raise CheckpointError(f"{flag} {path} has {meta['num_old']} old of {meta['num_classes']} classes, "
                              f"but {task.dataset_name}'s split here has {task.num_labeled_classes} of "
                              f"{task.num_classes}")
    return task.with_k(meta["num_classes"], "checkpoint")


@torch.no_grad()
def predict_clusters(model: GETModel, loader: DataLoader, device: str, progress: bool, desc: str,
                     with_tes: bool = False, check: Callable = lambda batch: batch) -> dict[str, np.ndarray]:
    """Cluster ids per head ('visual', 'text', 'fused': int [N]), 'fused_prob' [N], 'target'
    [N] (labels, or NO_LABEL) in the order of the dataset, and with ``with_tes`` the TES
    outputs 'tes' float32 [N, embed_dim]. ``check`` sees (and returns) each batch of ``loader``
    before the model does."""
    def compute(frozen: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        out = model.predict_from(*frozen)  # the frozen CLIP ran once, in frozen_batches
        extra = {"tes": frozen[1].float()} if with_tes else {}
        return {"clusters": head_clusters(out), "fused_prob": out["fused_probs"].max(dim=1).values, **extra}

    batches = frozen_batches(model, map(check, loader), torch.device(device))
    gathered = by_head(gather_outputs(batches, compute, DistInfo(), total=len(loader), progress=progress, desc=desc))
    return {key: value.numpy() for key, value in gathered.items()}


def match_old_classes(clusters: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """{cluster: old class}: the one-to-one assignment of old classes to clusters that
    maximises the number of labelled images whose cluster is matched to their class
    (the Hungarian matching of the evaluation). A class assigned to a cluster that holds
    none of its images is left unmatched.

    clusters: int [N] predicted cluster of each labelled image; labels: int [N] in [0, num_old).
    """
    matched = cluster_to_class(labels, clusters)
    hits = matched[clusters] == labels
    return {int(c): int(matched[c]) for c in np.unique(clusters[hits])}


def cluster_names(matches: dict[int, int], class_names: list[str], num_clusters: int) -> dict[int, str]:
    """Name of every cluster: its matched old class's, else new_<id>."""
    return {c: class_names[matches[c]] if c in matches else f"new_{c}" for c in range(num_clusters)}


def name_by_candidates(tes_out: np.ndarray, clusters: np.ndarray, to_name: list[int], text: Tensor,
                       candidates: list[str]) -> dict[int, tuple[str, float]]:
    """{cluster: (candidate, cosine)} for each cluster of ``to_name``: the candidate whose text
    embedding is closest to the mean of the cluster's L2-normalised TES outputs.

    tes_out: [N, D] TES outputs; clusters: int [N]; text: [M, D] normalised embeddings of the
    M candidates' prompts.
    """
    feats = F.normalize(torch.as_tensor(tes_out, dtype=torch.float32), dim=-1)
    named = {}
    for cluster in to_name:
        mean = F.normalize(feats[torch.as_tensor(clusters == cluster)].mean(dim=0), dim=0)
        sims = text.float() @ mean
        best = int(sims.argmax())
        named[cluster] = (candidates[best], float(sims[best]))
    return named


def cluster_summary(clusters: np.ndarray, names: dict[int, str], matches: dict[int, int],
                    similarity: dict[int, float]) -> str:
    """One line per cluster that received images: id, old/new, name, images, similarity."""
    ids, counts = np.unique(clusters, return_counts=True)
    return "\n".join(f"    cluster {c:>4d}  {'old' if c in matches else 'new'}  {n:>6d} images  {names[c]}"
                     + (f"  (similarity {similarity[c]:.3f})" if c in similarity else "")
                     for c, n in zip(ids.tolist(), counts.tolist()))
