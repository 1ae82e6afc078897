"""Cluster new images with a trained GET model and name the clusters.

    python predict.py --checkpoint RUN/last.pt --images DIR --out predictions.csv
    python predict.py --checkpoint RUN/last.pt --images DIR --out predictions.csv \\
        --name_candidates names.txt          # name the new clusters from a list of words

One CSV row per image file under ``--images`` (any nesting, sorted by path): the fused cluster
and its probability, the visual and the text cluster, each with a name. A cluster matched to
an old class carries that class's name; the matching is the Hungarian assignment between the
model's clusters and the old classes on the labelled training images of the run's dataset (so
the dataset must be readable, as for training). Every other cluster is ``new_<id>``.

With ``--name_candidates FILE`` (one name per line) each new fused cluster is named by the
candidate whose CLIP text embedding of the run's prompt ("a photo of a {}") is closest (cosine)
to the mean pseudo-text embedding of the cluster's images: the output of GET's Text Embedding
Synthesizer, which lives in CLIP's text space. The cosine goes to ``name_similarity``.

The model is rebuilt from the checkpoint's flags; the CLIP weights come from the run's
``--pretrained`` unless this script's ``--pretrained`` says otherwise. A weights file is only
loaded when the user names it: a run trained with ``--pretrained FILE`` needs ``--pretrained``
here too (open_clip tags such as ``openai`` are followed).

The CSV is safe to open in a spreadsheet and is written whole or not at all (docs/predictions.md):
a text cell that a spreadsheet would run as a formula gets a leading ``'``; names are written as
the file system gives them (bytes that are not UTF-8 stay those bytes); the file is written under
a temporary name and renamed into place once complete. Every flag is checked before the
checkpoint, the model or any image is read. An unreadable image stops the prediction with its
path; ``--skip_bad_images`` leaves it out of the CSV instead.
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
import tempfile
from argparse import Namespace
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
from data.data_utils import NO_LABEL, load_image, read_utf8_lines, skip_bad_images
from data.get_datasets import get_datasets
from data.task import Task, task_from_args
from errors import USER_ERRORS, CheckpointError, ImageLoadError, InputError
from evaluation.accuracy import cluster_to_class
from evaluation.predict import by_head, frozen_batches, gather_outputs, head_clusters
from model import GETModel
from params import device_problem, prompt_template_problem, resolve_device
from runs.checkpoints import load_stage2_checkpoint, model_from_checkpoint
from runs.run import SKIPPED_IMAGES
from util.dist import DistInfo
from util.io import atomic_file
from util.logging_utils import get_logger, setup_logging
from vocabulary import HEADS


# File types read as images (lower case); anything else under --images is ignored.
IMAGE_EXTENSIONS = frozenset((".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm"))
COLUMNS = ("path", "fused_cluster", "fused_prob", "fused_kind", "fused_name", "name_similarity",
           "visual_cluster", "visual_name", "text_cluster", "text_name")
# What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The target of an image file that could not be read (--skip_bad_images): it gets no row.
UNREADABLE = -2


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict clusters of a folder of images with a stage-2 GET "
                                "checkpoint; write one CSV row per image.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint of a run (last.pt or best.pt)")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", default="predictions.csv", help="CSV file to write")
    p.add_argument("--name_candidates", default=None,
                   help="text file, one candidate name per line: names the new clusters")
    p.add_argument("--prompt_template", default=None,
                   help="prompt of the candidate names (default: the run's --prompt_template)")
    p.add_argument("--pretrained", default=None,
                   help="CLIP weights (open_clip tag, file or 'none'); default: the run's")
    p.add_argument("--clip_cache_dir", default=None, help="open_clip download cache; default: the run's")
    p.add_argument("--data_root", default=None,
                   help="the run's dataset folder, for its labelled images; default: the run's")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast of the CLIP encoders (default: on with CUDA)")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    p.add_argument("--num_workers", type=int, default=4, help="image-loading processes")
    p.add_argument("--skip_bad_images", action=argparse.BooleanOptionalAction, default=False,
                   help="leave unreadable files of --images out of the CSV (and replace unreadable "
                        "labelled images of the run by the next one, as train.py does) instead of stopping")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default: only when attached to a terminal)")
    return p


class ImageFiles(Dataset):
    """Image files with the test transform: item (image [3, H, W], NO_LABEL, position); an
    unreadable file gives a blank stand-in image and the target UNREADABLE.

    The main process decides what an unreadable file means (``refuse_unreadable``,
    ``drop_unreadable``): an error raised in a loader's worker process would reach the user
    wrapped in that process's traceback."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        try:
            return self.transform(load_image(self.paths[index], "predict.py --images")), NO_LABEL, index
        except ImageLoadError:
            return self.transform(Image.new("RGB", (1, 1))), UNREADABLE, index


def main(argv: list[str] | None = None) -> Path:
    """Write the predictions CSV; returns its path."""
    opts = get_args_parser().parse_args(argv)
    setup_logging(None)
    log = get_logger()
    # Every input is checked before the model is built or any image is read: the flags first.
    device = resolve_device(opts.device)
    problem = flag_problem(opts) or device_problem(device)
    if problem:
        raise InputError(problem)
    progress = sys.stderr.isatty() if opts.progress is None else opts.progress
    image_root, paths = find_images(opts.images)
    candidates = read_candidates(opts.name_candidates) if opts.name_candidates else None
    check_out_is_no_input(Path(opts.out), opts, paths)
    ckpt = read_stage2_checkpoint(opts.checkpoint)
    check_pretrained(ckpt["args"], opts)
    args = run_args(ckpt, opts, device)
    task = run_task(args, ckpt, opts.checkpoint)
    num_classes, class_names = task.num_classes, task.class_names
    _, test_tf = get_transforms(image_size=vision_image_size(args.clip_model), normalization=args.normalization)
    labelled = get_datasets(task.dataset_name, test_tf, test_tf, task)[3]["train_labelled"]
    loader_opts = dict(batch_size=opts.batch_size, num_workers=opts.num_workers,
                       pin_memory=device.startswith("cuda"))

    model = model_from_checkpoint(build_clip(args, device), ckpt, opts.checkpoint, args.amp).eval()
    log.info("matching clusters to the %d old classes on %d labelled images of %s", task.num_labeled_classes,
             len(labelled), task.dataset_name)
    matches = match_on_labelled(model, DataLoader(labelled, **loader_opts), device, progress, opts.skip_bad_images)
    names = {head: cluster_names(matches[head], class_names, num_classes) for head in HEADS}

    log.info("predicting %d images of %s", len(paths), image_root)
    check = (lambda batch: batch) if opts.skip_bad_images else partial(refuse_unreadable, paths)
    pred = predict_clusters(model, DataLoader(ImageFiles(paths, test_tf), **loader_opts), device, progress,
                            "images", with_tes=candidates is not None, check=check)
    paths, pred = drop_unreadable(paths, pred)
    similarity: dict[int, float] = {}
    if candidates is not None:
        text = class_text_embeddings(model.clip, get_tokenizer(args.clip_model), candidates,
                                     opts.prompt_template or args.prompt_template).cpu()
        new_clusters = sorted(set(pred["fused"].tolist()) - set(matches["fused"]))
        for cluster, (name, sim) in name_by_candidates(pred["tes"], pred["fused"], new_clusters, text,
                                                       candidates).items():
            names["fused"][cluster], similarity[cluster] = name, sim

    out = Path(opts.out)
    write_csv(out, [p.relative_to(image_root).as_posix() for p in paths], pred, names, matches["fused"],
              similarity)
    log.info("clusters of the %d images (fused):\n%s", len(paths),
             cluster_summary(pred["fused"], names["fused"], matches["fused"], similarity))
    log.info("wrote %d predictions to %s", len(paths), out)
    return out


def flag_problem(opts: Namespace) -> str | None:
    """The first flag whose value cannot work, as a message naming it; None if all can."""
    checks = [
        (opts.batch_size >= 1, f"--batch_size must be >= 1; got {opts.batch_size}"),
        (opts.num_workers >= 0, f"--num_workers must be >= 0; got {opts.num_workers}"),
    ]
    problem = next((message for ok, message in checks if not ok), None)
    template = opts.prompt_template
    return problem or (prompt_template_problem(template) if template is not None else None) or out_problem(opts.out)


def out_problem(out: str) -> str | None:
    """What keeps ``--out`` from being written as a file, if anything (checked before the long work)."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        return f"--out {out} is a folder; give the path of the CSV file to write, e.g. {path / 'predictions.csv'}"
    for folder in path.parents:  # the nearest one that exists must be a folder we may write in
        if folder.exists():
            if not folder.is_dir():
                return f"--out {out}: {folder} is a file, not a folder; give a CSV path in a folder"
            if not os.access(folder, os.W_OK):
                return f"--out {out}: no permission to write in {folder}; give a CSV path in another folder"
            break
    return None


def check_out_is_no_input(out: Path, opts: Namespace, images: list[Path]) -> None:
    """Refuse an --out that would overwrite the checkpoint, the candidates or an image."""
    if not out.is_file():
        return
    inputs = [(Path(opts.checkpoint), "--checkpoint"), *[(p, "an image of --images") for p in images
                                                         if p.suffix.lower() == out.suffix.lower()]]
    if opts.name_candidates:
        inputs.append((Path(opts.name_candidates), "--name_candidates"))
    for path, what in inputs:
        if path.is_file() and os.path.samefile(out, path):
            raise InputError(f"--out {out} is {what}; writing the CSV would replace it. Give another --out")


def check_pretrained(run_flags: dict, opts: Namespace) -> None:
    """A weights file that only the checkpoint names is not loaded: the checkpoint may come from
    elsewhere, and its path may now hold anything. The user names the file (tags are followed)."""
    recorded = run_flags.get("pretrained")
    if opts.pretrained is None and is_local_weights(recorded, run_flags.get("clip_model", "")):
        raise InputError(f"--checkpoint {opts.checkpoint} was trained with --pretrained {recorded}; pass "
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
        try:
            on_labelled = predict_clusters(model, loader, device, progress, "labelled")
        except ImageLoadError as error:
            if skip_bad or "--skip_bad_images" in str(error):  # data/ may name the flag already
                raise
            raise ImageLoadError(f"{error} Or pass --skip_bad_images to replace it by the next labelled "
                                 "image, as train.py does") from error
        lines = skip_log.read_text(encoding="utf-8", errors="surrogateescape") if skip_log.is_file() else ""
    for line in sorted(set(lines.splitlines())):
        get_logger().warning("replaced by the next labelled image (--skip_bad_images): %s", line)
    return {head: match_old_classes(on_labelled[head], on_labelled["target"]) for head in HEADS}


def refuse_unreadable(paths: list[Path], batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``batch`` of ImageFiles(paths), or the error for its first unreadable file."""
    _, targets, indices = batch
    unreadable = indices[targets == UNREADABLE]
    if len(unreadable):
        path = paths[int(unreadable[0])]
        raise ImageLoadError(f"--images: cannot read {path} ({unreadable_reason(path)}). "
                             "Replace or remove the file, or pass --skip_bad_images to leave it out of the CSV")
    return batch


def unreadable_reason(path: Path) -> str:
    """Why ``path`` cannot be read, asked again here (the worker that failed cannot say)."""
    try:
        load_image(path, "predict.py --images")
    except ImageLoadError as error:
        return str(error.__cause__ or error)
    return "it could not be read a moment ago"


def drop_unreadable(paths: list[Path], pred: dict[str, np.ndarray]) -> tuple[list[Path], dict[str, np.ndarray]]:
    """The paths and predictions without the images that could not be read (--skip_bad_images)."""
    readable = pred["target"] != UNREADABLE
    for i in np.flatnonzero(~readable):
        get_logger().warning("left out of the CSV (--skip_bad_images): %s (%s)", paths[i],
                             unreadable_reason(paths[i]))
    if not readable.any():
        raise ImageLoadError(f"--images: none of the {len(paths)} image files could be read")
    return [p for p, ok in zip(paths, readable) if ok], {key: value[readable] for key, value in pred.items()}


def find_images(folder: str) -> tuple[Path, list[Path]]:
    """(the folder, its image files at any depth, sorted); hidden files are skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    paths = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
    if not paths:
        raise FileNotFoundError(f"--images {folder}: no image file in this folder or below "
                                "(looked for .jpg, .jpeg, .png, .webp, ... at any depth)")
    return root, paths


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


def read_stage2_checkpoint(path: str) -> dict:
    ckpt = load_stage2_checkpoint(path, "--checkpoint")
    if not isinstance(ckpt.get("args"), dict):
        raise CheckpointError(f"--checkpoint {path} does not carry the flags of its run ('args')")
    return ckpt


def run_args(ckpt: dict, opts: Namespace, device: str) -> Namespace:
    """The run's flags, with this script's overrides."""
    overrides = {key: getattr(opts, key) for key in ("pretrained", "clip_cache_dir", "data_root")
                 if getattr(opts, key) is not None}
    amp = device.startswith("cuda") if opts.amp is None else opts.amp
    return Namespace(**{**ckpt["args"], **overrides, "device": device, "amp": amp, "download": False})


def run_task(args: Namespace, ckpt: dict, path: str) -> Task:
    """The run's task, with the checkpoint's K, checked against the checkpoint's split."""
    task = task_from_args(args)
    meta = ckpt["meta"]
    if task.num_labeled_classes != meta["num_old"] or (not task.k_pending and task.num_classes != meta["num_classes"]):
        raise CheckpointError(f"--checkpoint {path} has {meta['num_old']} old of {meta['num_classes']} classes, "
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


def write_csv(out: Path, rel_paths: list[str], pred: dict[str, np.ndarray], names: dict[str, dict[int, str]],
              fused_matches: dict[int, int], similarity: dict[int, float]) -> None:
    """The CSV, complete or not at all; every text cell (path, names) through ``formula_safe``.
    Names that are not valid UTF-8 reach Python as str with surrogate escapes: 'surrogateescape'
    writes them back as the bytes the file system gave, so a path read back opens the file."""
    with atomic_file(out, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i, path in enumerate(rel_paths):
            fused, visual, text = int(pred["fused"][i]), int(pred["visual"][i]), int(pred["text"][i])
            sim = f"{similarity[fused]:.4f}" if fused in similarity else ""
            writer.writerow([formula_safe(path), fused, f"{pred['fused_prob'][i]:.4f}",
                             "old" if fused in fused_matches else "new", formula_safe(names["fused"][fused]), sim,
                             visual, formula_safe(names["visual"][visual]), text, formula_safe(names["text"][text])])


def formula_safe(cell: str) -> str:
    """``cell`` with a ``'`` in front when a spreadsheet would run it as a formula: it starts with
    one of FORMULA_START, after any quotes. Counting the quotes makes the rule exactly undoable:
    strip one leading quote from a cell that starts with quotes and then one of FORMULA_START."""
    return "'" + cell if cell.lstrip("'").startswith(FORMULA_START) else cell


def unescape_formula(cell: str) -> str:
    """The cell as it was before ``formula_safe`` (for a reader of the CSV)."""
    return cell[1:] if cell.startswith("'") and cell.lstrip("'").startswith(FORMULA_START) else cell


def cluster_summary(clusters: np.ndarray, names: dict[int, str], matches: dict[int, int],
                    similarity: dict[int, float]) -> str:
    """One line per cluster that received images: id, old/new, name, images, similarity."""
    ids, counts = np.unique(clusters, return_counts=True)
    return "\n".join(f"    cluster {c:>4d}  {'old' if c in matches else 'new'}  {n:>6d} images  {names[c]}"
                     + (f"  (similarity {similarity[c]:.3f})" if c in similarity else "")
                     for c, n in zip(ids.tolist(), counts.tolist()))


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
