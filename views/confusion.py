"""Confusion matrices of a run with ground truth: where the images of each true class went,
under the Hungarian matching of the reported accuracy (evaluation/accuracy.py), so that a
perfect result is diagonal and the diagonal holds exactly the accuracy's matched images.

    matrix = confusion_matrix(targets, clusters, class_names, num_old=3, num_clusters=6)
    matrix.accuracy()                        # the v2 All accuracy of (targets, clusters)
    most_confused([matrix])                  # [Confused('a', 'b', images=5, of=20), ...]
    save(matrix, path); load(path)           # the counts as JSON: report.py redraws without the model
    draw(matrix, "test / fused", path)       # the heat map as PNG (matplotlib, imported only here)

Rows are the true classes in task order (old, then new). Columns are the clusters: those
matched to a class in the order of their class, then the unmatched ones (more clusters than
classes) in id order. Classes without an image in the split and empty clusters matched to none
of the others are left out: they hold no image.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from errors import InputError
from evaluation.accuracy import cluster_to_class
from vocabulary import HEADS, SPLITS

TOP_PAIRS = 10        # confused class pairs in the log and the report
CELL_INCHES = 0.1     # a heat map grows by this per class or cluster ...
MAP_INCHES = (3.0, 18.0)  # ... between these sides (200 classes reach the cap)
MAX_LABELS = 50       # tick labels per axis at most: beyond, every k-th row / column is labelled
NAME_CHARS = 32       # class names longer than this are cut in the tick labels
MIN_FIGURE_WIDTH = 7.6  # inches: the x axis's title fits


@dataclass
class Confusion:
    """One head's clusters on one split against the true classes, columns in matched order."""
    counts: np.ndarray               # int [classes, clusters]: images of row's class in column's cluster
    classes: list[str]               # the name of each row's class
    clusters: list[int]              # the cluster id of each column
    column_class: list[int | None]   # the class (row) each column's cluster is matched to; None: unmatched
    num_old: int                     # rows 0..num_old-1 are the old classes

    def diagonal(self) -> np.ndarray:
        """Int [classes]: each class's images in its matched cluster (0 for a class without one)."""
        hits = np.zeros(len(self.classes), dtype=np.int64)
        for column, row in enumerate(self.column_class):
            if row is not None:
                hits[row] = self.counts[row, column]
        return hits

    def accuracy(self, eval_func: str = "v2") -> float:
        """The All accuracy the evaluation reports: matched images / images ('v2'), or the mean
        over the classes present of their share in their matched cluster ('v2b')."""
        totals = self.counts.sum(1)
        if eval_func == "v2b":
            present = totals > 0
            return float((self.diagonal()[present] / totals[present]).mean()) if present.any() else 0.0
        return float(self.diagonal().sum() / max(totals.sum(), 1))

    def blocks(self) -> tuple[int, int]:
        """(columns matched to old classes, columns matched to any class): the column edges
        between the old, new and unmatched blocks (columns are sorted that way)."""
        matched = [row for row in self.column_class if row is not None]
        return sum(row < self.num_old for row in matched), len(matched)

    def record(self) -> dict:
        return {"classes": self.classes, "num_old_classes": self.num_old, "clusters": self.clusters,
                "column_class": self.column_class, "counts": self.counts.tolist(),
                "images": int(self.counts.sum()), "matched_images": int(self.diagonal().sum())}


def confusion_matrix(y_true, y_pred, class_names: list[str] | tuple[str, ...], num_old: int,
                     num_clusters: int) -> Confusion:
    """The confusion matrix of true classes ``y_true`` [N] (indices into ``class_names``, the
    first ``num_old`` old) against cluster ids ``y_pred`` [N] (0..``num_clusters``-1, or more),
    matched as ``cluster_to_class`` matches for the accuracy."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.size == 0 or y_true.size != y_pred.size:
        raise ValueError(f"need as many labels as predictions (at least one), got {y_true.size} and {y_pred.size}")
    num_classes, num_clusters = len(class_names), max(num_clusters, int(y_pred.max()) + 1)
    if y_true.min() < 0 or y_true.max() >= num_classes or y_pred.min() < 0:
        raise ValueError(f"labels must lie in 0..{num_classes - 1} and cluster ids be non-negative")
    counts = np.bincount(y_true * num_clusters + y_pred, minlength=num_classes * num_clusters)
    counts = counts.reshape(num_classes, num_clusters)
    # The matching of the accuracy, over the ids up to the largest one seen: any higher id was
    # never seen, as a class or as a cluster, and holds no image.
    owner = np.full(num_clusters, -1)
    matched = cluster_to_class(y_true, y_pred)[:num_clusters]
    owner[:len(matched)] = np.where(matched < num_classes, matched, -1)
    # Rows: the classes with images in this split. Columns: the clusters with images, and those
    # matched to one of these classes (an empty one: that class lost all its images). The rest
    # holds no image: left out, a few classes of a big dataset make a small figure.
    rows = np.flatnonzero(counts.sum(1) > 0)
    row_of = np.full(num_classes + 1, -1)  # index -1 (unmatched) maps to -1 too
    row_of[rows] = np.arange(len(rows))
    owner = row_of[owner]
    kept = [c for c in range(num_clusters) if owner[c] >= 0 or counts[:, c].any()]
    order = sorted(kept, key=lambda c: (owner[c] < 0, owner[c], c))
    return Confusion(counts[np.ix_(rows, order)], [class_names[r] for r in rows], order,
                     [int(owner[c]) if owner[c] >= 0 else None for c in order], int((rows < num_old).sum()))


def run_matrices(preds: dict, class_names, num_old: int, num_clusters: int) -> dict[tuple[str, str], Confusion]:
    """{(split, head): Confusion} of an evaluation's predictions ({split: ``predict_split``})."""
    return {(split, head): confusion_matrix(preds[split]["target"], preds[split][head], class_names, num_old,
                                            num_clusters)
            for split in SPLITS if split in preds for head in HEADS if head in preds[split]}


# ------------------------------------------------------------------ the most confused classes
class Confused(NamedTuple):
    """Images of class ``true`` that went to the cluster matched to class ``taken_by``."""
    true: str
    taken_by: str
    images: int
    of: int  # the images of class ``true``

    @property
    def share(self) -> float:
        return self.images / max(self.of, 1)


def most_confused(matrices: list[Confusion], top: int = TOP_PAIRS) -> list[Confused]:
    """The ``top`` class pairs (true class, the class whose matched cluster took its images),
    most images first, pooled by class name over ``matrices`` (one per run of an experiment:
    each run's own matching). Images in unmatched clusters belong to no pair."""
    images: dict[tuple[str, str], int] = {}
    totals: dict[str, int] = {}
    for m in matrices:
        for name, total in zip(m.classes, m.counts.sum(1)):
            totals[name] = totals.get(name, 0) + int(total)
        for column, owner in enumerate(m.column_class):
            if owner is None:
                continue  # an unmatched cluster stands for no class
            for row in np.flatnonzero(m.counts[:, column]):
                if row != owner:
                    pair = (m.classes[row], m.classes[owner])
                    images[pair] = images.get(pair, 0) + int(m.counts[row, column])
    pairs = [Confused(true, taken_by, n, totals[true]) for (true, taken_by), n in images.items()]
    return sorted(pairs, key=lambda p: (-p.images, -p.share, p.true, p.taken_by))[:top]


def format_confused(pairs: list[Confused]) -> str:
    """One indented line per pair, for the log."""
    if not pairs:
        return "\n    none: every image is in its class's cluster or in an unmatched one"
    width = max(len(p.true) for p in pairs)
    return "".join(f"\n    {p.true:<{width}} -> {p.taken_by}: {p.images} of {p.of} images ({p.share:.1%})"
                   for p in pairs)


def pairs_table(matrices: dict[str, list[Confusion]]) -> list[str]:
    """Markdown lines: the most confused pairs of each head ({head: matrices of its runs}), one
    column per head, one row per rank."""
    heads = list(matrices)
    columns = [most_confused(matrices[head]) for head in heads]
    lines = ["| rank | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for rank in range(max(map(len, columns), default=0)):
        cells = [pair_cell(pairs[rank]) if rank < len(pairs) else "" for pairs in columns]
        lines.append(f"| {rank + 1} | " + " | ".join(cells) + " |")
    return lines


def pair_cell(p: Confused) -> str:
    """'a → b: 3/10 (30%)', a Markdown table cell."""
    return f"{_escape(p.true)} → {_escape(p.taken_by)}: {p.images}/{p.of} ({p.share:.0%})"


def _escape(name: str) -> str:
    return name.replace("|", "\\|")  # a class name must not split the table's cell


# ------------------------------------------------------------------ files
def matrix_path(folder: Path, split: str, head: str, suffix: str) -> Path:
    """``folder/<split>_<head><suffix>``: the JSON counts ('.json') or the heat map ('.png')."""
    return folder / f"{split}_{head}{suffix}"


def save(matrix: Confusion, path: Path) -> None:
    # Compact, one line per row: a 1000-class matrix is a few MB instead of a million lines.
    record = matrix.record()
    counts = record.pop("counts")
    body = json.dumps(record, sort_keys=True)[:-1]
    rows = ",\n".join(json.dumps(row, separators=(",", ":")) for row in counts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{body}, "counts": [\n{rows}\n]}}\n', encoding="utf-8")


def load(path: Path) -> Confusion:
    """A matrix written by ``save``; anything else is refused, naming the file."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        counts = np.asarray(record["counts"], dtype=np.int64)
        matrix = Confusion(counts, [str(c) for c in record["classes"]], [int(c) for c in record["clusters"]],
                           [None if c is None else int(c) for c in record["column_class"]],
                           int(record["num_old_classes"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path} is not a confusion matrix ({err}); delete it or rerun --stage eval") from err
    rows, columns = len(matrix.classes), len(matrix.clusters)
    if (counts.shape != (rows, columns) or len(matrix.column_class) != columns or counts.min(initial=0) < 0
            or any(c is not None and not 0 <= c < rows for c in matrix.column_class)):
        raise InputError(f"{path}: counts, classes, clusters and column_class do not fit together; delete it "
                         "or rerun --stage eval")
    return matrix


def read_run(run_dir: Path, folder: str, split: str) -> dict[str, Confusion]:
    """{head: Confusion} of one split of a run folder (``folder``: its confusion folder's
    name); heads without a file are left out (older runs, runs without ground truth)."""
    paths = {head: matrix_path(run_dir / folder, split, head, ".json") for head in HEADS}
    return {head: load(path) for head, path in paths.items() if path.is_file()}


# ------------------------------------------------------------------ the heat map
def map_inches(n: int) -> float:
    """The side of the heat map for ``n`` rows or columns: grows with them, capped."""
    low, high = MAP_INCHES
    return min(max(CELL_INCHES * n, low), high)


def label_step(n: int) -> int:
    """Label every k-th of ``n`` rows or columns so that at most MAX_LABELS labels show."""
    return max(1, math.ceil(n / MAX_LABELS))


def figure(matrix: Confusion, title: str):
    """The heat map as a matplotlib Figure (Agg canvas): rows normalised per class, lines and
    labels between the old and new classes and between the old, new and unmatched clusters."""
    # Imported here: a run pays for matplotlib only when it draws.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, columns = matrix.counts.shape
    width, height = map_inches(columns), map_inches(rows)
    # Room beyond the map, in inches: class names on the left, the block labels and the colour
    # bar on the right, the title and block labels above, cluster ids and the axis title below.
    # Fixed margins, not a layout engine: matplotlib's constrained layout doubled the drawing time.
    longest = max((len(_short(name)) for name in matrix.classes), default=1)
    left, right, top, bottom = 0.7 + longest * 0.06, 1.4, 0.7, 0.8  # names at 8 pt: ~0.06 in a letter
    spare = max(MIN_FIGURE_WIDTH - (width + left + right), 0.0)  # room for the x axis's title
    left, right = left + spare / 2, right + spare / 2
    fig = Figure(figsize=(width + left + right, height + top + bottom))
    FigureCanvasAgg(fig)
    fig_w, fig_h = fig.get_size_inches()
    ax = fig.add_axes((left / fig_w, bottom / fig_h, width / fig_w, height / fig_h))
    bar = fig.add_axes(((left + width + 0.55) / fig_w, bottom / fig_h, 0.15 / fig_w, height / fig_h))
    shares = matrix.counts / np.maximum(matrix.counts.sum(1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, cax=bar).set_label("share of the true class's images (rows normalised)",
                                                   fontsize=8)
    old_columns, matched = matrix.blocks()
    row_blocks = _blocks([("old", 0, matrix.num_old), ("new", matrix.num_old, rows)])
    column_blocks = _blocks([("old", 0, old_columns), ("new", old_columns, matched),
                             ("unmatched", matched, columns)])
    for _, start, _ in row_blocks[1:]:
        ax.axhline(start - 0.5, color="tab:red", linewidth=1.2)
    for _, start, _ in column_blocks[1:]:
        ax.axvline(start - 0.5, color="tab:red", linewidth=1.2)
    _ticks(ax.set_yticks, rows, [_short(name) for name in matrix.classes], height)
    _ticks(ax.set_xticks, columns, [str(c) for c in matrix.clusters], width, rotation=90)
    for axis, blocks in ((ax.secondary_yaxis("right"), row_blocks), (ax.secondary_xaxis("top"), column_blocks)):
        axis.set_ticks([(start + end - 1) / 2 for _, start, end in blocks], [name for name, _, _ in blocks])
        axis.tick_params(length=0, labelcolor="tab:red")
    ax.set_xlabel("cluster, ordered by the class it is matched to (Hungarian matching of the accuracy)")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return fig


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "…"


def _blocks(blocks: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    return [block for block in blocks if block[2] > block[1]]


def _ticks(set_ticks, n: int, labels: list[str], inches: float, rotation: int = 0) -> None:
    """Every ``label_step``-th of ``n`` positions labelled, in a font that fits their spacing."""
    positions = list(range(0, n, label_step(n)))
    spacing = inches * 72 / max(len(positions), 1)  # points between two labels
    set_ticks(positions, [labels[i] for i in positions], fontsize=min(8.0, 0.9 * spacing), rotation=rotation)


def draw(matrix: Confusion, title: str, path: Path) -> Path:
    """The heat map of ``figure`` as a PNG at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure(matrix, title).savefig(path, dpi=100)
    return path


def title_of(split: str, head: str, matrix: Confusion, eval_func: str = "v2") -> str:
    """'<split> / <head>: All 0.9462 (v2), 2000 images' (the accuracy the matrix gives)."""
    return (f"{split} / {head}: All {matrix.accuracy(eval_func):.4f} ({eval_func}), "
            f"{int(matrix.counts.sum())} images")
