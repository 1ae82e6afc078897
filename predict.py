"""Cluster new images with a trained GET model and name the clusters.

    python predict.py --checkpoint RUN/last.pt --images DIR --out predictions.csv
    python predict.py --checkpoint RUN/last.pt --images DIR --out predictions.csv \\
        --name_candidates names.txt          # name the new clusters from a list of words
    python predict.py --checkpoint RUN/last.pt --images DIR --gallery gallery/   # and a page to look at

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

``--gallery DIR`` also writes a web page of the fused clusters, their names and their most and
least confident images (views/gallery.py). The run is loaded, matched and put to use by
views/trained_run.py, which ``report.py --gallery RUN`` shares for a run's own unlabelled
training images.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from argparse import Namespace
from functools import partial
from pathlib import Path

import numpy as np

from errors import USER_ERRORS, InputError
from params import device_problem, prompt_template_problem, resolve_device
from util.io import atomic_file, unwritable_parent
from util.logging_utils import get_logger, setup_logging
from views import gallery
from views.trained_run import (BATCH_SIZE, ImageSource, cluster_summary, drop_unreadable, load_run, open_file,
                               predict_clusters, propose_names, read_candidates, read_file, refuse_unreadable,
                               write_gallery)
from vocabulary import HEADS


# File types read as images (lower case); anything else under --images is ignored.
IMAGE_EXTENSIONS = frozenset((".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm"))
COLUMNS = ("path", "fused_cluster", "fused_prob", "fused_kind", "fused_name", "name_similarity",
           "visual_cluster", "visual_name", "text_cluster", "text_name")
# What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


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
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="images per forward pass")
    p.add_argument("--num_workers", type=int, default=4, help="image-loading processes")
    p.add_argument("--skip_bad_images", action=argparse.BooleanOptionalAction, default=False,
                   help="leave unreadable files of --images out of the CSV (and replace unreadable "
                        "labelled images of the run by the next one, as train.py does) instead of stopping")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default: only when attached to a terminal)")
    p.add_argument("--gallery", default=None,
                   help="also write a web page of the clusters and their images into this folder "
                        "(new, empty, or an earlier gallery): DIR/index.html and DIR/thumbs/")
    p.add_argument("--gallery_per_cluster", type=int, default=gallery.PER_CLUSTER,
                   help="thumbnails per cluster in the gallery: the most confident images, and a "
                        "quarter of them the least confident")
    return p


def main(argv: list[str] | None = None) -> Path:
    """Write the predictions CSV (and the gallery, with --gallery); returns the CSV's path."""
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
    if opts.gallery and (problem := gallery.inside_problem(Path(opts.gallery), image_root, "--gallery", "--images")):
        raise InputError(problem)
    candidates = read_candidates(opts.name_candidates) if opts.name_candidates else None
    check_out_is_no_input(Path(opts.out), opts, paths)
    run = load_run(opts, device, progress)

    log.info("predicting %d images of %s", len(paths), image_root)
    check = (lambda batch: batch) if opts.skip_bad_images else partial(refuse_unreadable, paths)
    pred = predict_clusters(run.model, run.loader(ImageSource(partial(read_file, paths), len(paths), run.transform)),
                            device, progress, "images", with_tes=candidates is not None, check=check)
    labels = [p.relative_to(image_root).as_posix() for p in paths]
    kept, pred, unreadable = drop_unreadable(labels, partial(read_file, paths), pred,
                                             "left out of the CSV (--skip_bad_images)", "--images")
    paths = [paths[i] for i in kept]
    proposed = propose_names(run, pred, candidates, opts.prompt_template) if candidates else {}
    names = {head: run.names(head) for head in HEADS}
    names["fused"].update({cluster: name for cluster, (name, _) in proposed.items()})
    similarity = {cluster: sim for cluster, (_, sim) in proposed.items()}

    out = Path(opts.out)
    write_csv(out, [labels[i] for i in kept], pred, names, run.matches["fused"], similarity)
    log.info("clusters of the %d images (fused):\n%s", len(paths),
             cluster_summary(pred["fused"], names["fused"], run.matches["fused"], similarity))
    log.info("wrote %d predictions to %s", len(paths), out)
    if opts.gallery:
        images = gallery.Images([labels[i] for i in kept], partial(open_file, paths), paths)
        write_gallery(Path(opts.gallery), "--gallery", run, pred, proposed, images, unreadable,
                      f"Clusters of {image_root}", opts.gallery_per_cluster)
    return out


def flag_problem(opts: Namespace) -> str | None:
    """The first flag whose value cannot work, as a message naming it; None if all can."""
    checks = [
        (opts.batch_size >= 1, f"--batch_size must be >= 1; got {opts.batch_size}"),
        (opts.num_workers >= 0, f"--num_workers must be >= 0; got {opts.num_workers}"),
        (opts.gallery_per_cluster >= 1, f"--gallery_per_cluster must be >= 1; got {opts.gallery_per_cluster}"),
    ]
    problem = next((message for ok, message in checks if not ok), None)
    template = opts.prompt_template
    return (problem or (prompt_template_problem(template) if template is not None else None) or out_problem(opts.out)
            or (gallery.folder_problem(Path(opts.gallery), "--gallery") if opts.gallery else None))


def out_problem(out: str) -> str | None:
    """What keeps ``--out`` from being written as a file, if anything (checked before the long work)."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        return f"--out {out} is a folder; give the path of the CSV file to write, e.g. {path / 'predictions.csv'}"
    problem = unwritable_parent(path)
    return f"--out {out}: {problem}; give a CSV path in a folder you can write to" if problem else None


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


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
