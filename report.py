"""Gather finished GET runs into paper-style tables: All / Old / New, mean ± std over seeds.

    python report.py outputs/cub outputs/cifar100            # tables of every finished run below
    python report.py outputs --split test --plots            # inductive split; learning curves too
    python report.py --gallery outputs/digits/demo-...       # a web page of a run's clusters

Runs are the folders holding ``config.json``; a finished run also holds ``final_metrics.json``
(the others are counted and skipped). Runs are grouped by dataset and experiment, the
``--exp_name`` without the ``-seed<N>`` that scripts/run_seeds.sh appends, and summarised per
head as mean ± sample standard deviation (n - 1) over the runs, in %. The reported head comes
first: the visual one, whose last-epoch accuracy GET's paper reports (the text and fused heads
are diagnostics), or the only head of a single-branch run (--branches visual / text); the
published GET accuracy of the dataset (``--published``, a CSV with its source) stands beside
the visual head of GET's runs only.

``--ablation`` adds one table per dataset with a row per experiment (scripts/run_ablation.sh
makes them): the flags it changes from GET, its reported head's All / Old / New and the change
of All from GET's row, with the text and fused heads' All as diagnostics.

Writes ``<out_dir>/results.md`` (also printed) and ``<out_dir>/results.csv``; with ``--plots``,
``<out_dir>/plots/<dataset>_<experiment>.png``: All / Old / New per head over the epochs of
``metrics.jsonl`` (mean over the runs, shaded ± std), one row per evaluated split.

results.md also lists, per experiment and head, the class pairs most confused in the runs'
final evaluation (pooled over the runs, from their ``confusion/<split>_<head>.json``); with
``--plots`` each run's confusion matrices are redrawn from those files, without the model, as
``<out_dir>/plots/confusion/<dataset>_<experiment>/<run folder>_<split>_<head>.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from errors import USER_ERRORS, InputError
from runs.resume import CHANGEABLE_ON_RESUME
from runs.run import CONFUSION_DIR
from views import confusion
from views.gallery import PER_CLUSTER
from vocabulary import GROUPS, HEADS, SPLITS, STAGE2, metric_key, parse_metric_key, reported_in

PUBLISHED = Path(__file__).resolve().parent / "docs" / "published_results.csv"
# Flags that may differ between the runs of one experiment without making them different
# experiments: the seed, and where / how each ran.
PER_RUN_FLAGS = frozenset({"seed", *CHANGEABLE_ON_RESUME})
CSV_COLUMNS = ("dataset", "experiment", "split", "head", "reported", "runs", "seeds", "all_mean", "all_std",
               "old_mean", "old_std", "new_mean", "new_std", "published_all", "published_old", "published_new",
               "published_source")
# The flags an ablation row changes from GET (scripts/run_ablation.sh), with GET's values.
ABLATION_FLAGS = {"branches": "both", "cico_weight": 1.0, "align_weight": 1.0, "distill_ce_weight": 1.0,
                  "distill_mse_weight": 1.0}
# The experiment an ablation table measures its rows against.
ABLATION_BASE = "ablation-get"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tables (and curves) of finished GET runs: All/Old/New, "
                                "mean ± std over seeds, beside the published numbers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="*", help="run folders, or folders searched for run folders")
    p.add_argument("--split", default="train_unlabelled", choices=SPLITS,
                   help="train_unlabelled: the transductive protocol papers report; test: inductive")
    p.add_argument("--out_dir", default="report", help="where results.md, results.csv and plots/ go")
    p.add_argument("--published", default=str(PUBLISHED),
                   help="CSV of published GET accuracy (columns dataset, all, source; old, new optional)")
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=False,
                   help="also one table of the experiments as ablation rows (scripts/run_ablation.sh)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=False,
                   help="also draw All/Old/New per head over epochs (needs matplotlib)")
    g = p.add_argument_group("gallery", "a web page of one run's clusters of its unlabelled training images, "
                             "made as predict.py --gallery makes one (see docs/predictions.md)")
    g.add_argument("--gallery", metavar="RUN", default=None,
                   help="run folder (its last.pt, else best.pt) or a stage-2 checkpoint")
    g.add_argument("--gallery_out", metavar="DIR", default=None,
                   help="folder of the page (new, empty, or an earlier gallery); default: RUN/gallery")
    g.add_argument("--gallery_per_cluster", type=int, default=PER_CLUSTER, help="thumbnails per cluster")
    g.add_argument("--name_candidates", default=None,
                   help="text file, one candidate name per line: names the new clusters")
    g.add_argument("--pretrained", default=None,
                   help="CLIP weights of the run (needed when it was trained with a weights file)")
    g.add_argument("--data_root", default=None, help="the run's dataset folder; default: the run's")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    return p


@dataclass
class RunRecord:
    dir: Path
    config: dict
    final: dict

    @property
    def dataset(self) -> str:
        return self.config["dataset_name"]

    @property
    def experiment(self) -> str:
        return experiment_name(self.config["exp_name"])

    @property
    def seed(self) -> int:
        return self.config["seed"]


def experiment_name(exp_name: str) -> str:
    """The experiment a run belongs to: its --exp_name without a trailing -seed<N>."""
    return re.sub(r"-seed\d+$", "", exp_name)


def main(argv: list[str] | None = None) -> list[dict]:
    """Write the report; returns its CSV rows."""
    opts = get_args_parser().parse_args(argv)
    if opts.gallery:
        write_run_gallery(opts)
        if not opts.paths:
            return []
    if not opts.paths:
        raise InputError("give the run folders to report on (or --gallery RUN for the page of one run)")
    finished, unfinished = find_runs(opts.paths)
    runs = [run for run in finished if metric_key(opts.split, reported_in(run.final), "all") in run.final]
    for run in runs:
        check_metrics(run, opts.split)
    if not runs:
        raise FileNotFoundError(f"no finished run with {opts.split} metrics (final_metrics.json) under "
                                + ", ".join(opts.paths) + f"; {unfinished} run folder(s) without one")
    groups = group_runs(runs)
    published = read_published(opts.published) if opts.split == "train_unlabelled" else {}
    rows = [row for (dataset, experiment), group in groups.items()
            for row in summarise(group, dataset, experiment, opts.split, published.get(dataset))]
    notes = group_notes(groups)
    ablation = format_ablation(rows, groups) if opts.ablation else []
    if unfinished:
        notes.append(f"{unfinished} run folder(s) without final_metrics.json (unfinished, stage 1 only, or "
                     "--stage eval) were left out.")
    if len(finished) > len(runs):
        notes.append(f"{len(finished) - len(runs)} finished run(s) without {opts.split} metrics were left out.")
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    confusions = read_confusions(groups, opts.split)
    markdown = format_markdown(rows, opts.split, notes,
                               ablation + format_confusions(confusions, opts.split, out_dir, opts.plots))
    (out_dir / "results.md").write_text(markdown, encoding="utf-8")
    write_csv(out_dir / "results.csv", rows)
    print(markdown)
    written = [out_dir / "results.md", out_dir / "results.csv"]
    if opts.plots:
        for (dataset, experiment), group in groups.items():
            png = plot_group(group, dataset, experiment, out_dir / "plots")
            if png is None:
                print(f"no plot of {dataset} / {experiment}: no evaluated epoch in its metrics.jsonl",
                      file=sys.stderr)
            written += [png] if png else []
        written += draw_confusions(confusions, opts.split, out_dir)
    print("wrote " + ", ".join(map(str, written)))
    return rows


def find_runs(paths: list[str]) -> tuple[list[RunRecord], int]:
    """(finished runs below ``paths``, sorted by folder; number of run folders not finished)."""
    configs: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        configs.update([path / "config.json"] if (path / "config.json").is_file() else path.rglob("config.json"))
    runs, unfinished = [], 0
    for config_file in sorted(configs):
        config = read_json(config_file)
        if not isinstance(config, dict) or "dataset_name" not in config or "exp_name" not in config:
            continue  # a config.json of something else
        final = config_file.parent / "final_metrics.json"
        if final.is_file():
            runs.append(RunRecord(config_file.parent, config, read_final(final)))
        else:
            unfinished += 1
    return runs, unfinished


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err}); repair or move that run folder") from err


def read_final(path: Path) -> dict:
    final = read_json(path)
    if not isinstance(final, dict):
        raise InputError(f"{path} is not a JSON object of metrics; repair or move that run folder")
    return final


def run_heads(run: RunRecord, split: str) -> list[str]:
    """The heads of a run's final metrics of ``split``, the reported one first."""
    reported = reported_in(run.final)
    return [reported] + [head for head in HEADS if head != reported and metric_key(split, head, "all") in run.final]


def check_metrics(run: RunRecord, split: str) -> None:
    """Every accuracy of ``split`` that the tables read is a number, or the file is named."""
    path = run.dir / "final_metrics.json"
    for key in (metric_key(split, head, group) for head in run_heads(run, split) for group in GROUPS):
        if key not in run.final:
            raise InputError(f"{path} has no {key}; repair or move that run folder")
        value = run.final[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{path}: {key} is {value!r}, not a number; repair or move that run folder")


def group_runs(runs: list[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    """{(dataset, experiment): runs}, sorted by dataset then experiment."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.experiment), []).append(run)
    return dict(sorted(groups.items()))


Published = tuple[dict[str, float], str]  # ({'all': %, and 'old', 'new' where known}, source)


def read_published(path: str) -> dict[str, Published]:
    """{dataset: ({group: accuracy in %}, source)} from a CSV with columns dataset, all, source
    and optionally old and new."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--published {path}: no such file")
    with open(file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"dataset", "all", "source"} <= set(reader.fieldnames or ()):
            raise InputError(f"--published {path} needs the columns dataset, all, source")
        published = {}
        for line, row in enumerate(reader, start=2):
            if not (row["dataset"] or "").strip() or not (row["all"] or "").strip():
                continue
            figures = {}
            for group in GROUPS:
                cell = (row.get(group) or "").strip()
                try:
                    figures.update({group: float(cell)} if cell else {})
                except ValueError as err:
                    raise InputError(f"--published {path}, line {line}: '{group}' must be a number in %, "
                                     f"got {cell!r}") from err
            published[row["dataset"].strip()] = (figures, (row["source"] or "").strip())
        return published


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarise(runs: list[RunRecord], dataset: str, experiment: str, split: str,
              published: Published | None) -> list[dict]:
    """One CSV row per head of the runs, the reported head first: accuracies in %, mean and std
    over the runs; the published figures beside the visual head of GET's runs (both branches)."""
    heads = [head for head in run_heads(runs[0], split) if all(head in run_heads(run, split) for run in runs)]
    is_get = all(run.config.get("branches", "both") == "both" for run in runs)
    rows = []
    for head in heads:
        row = {"dataset": dataset, "experiment": experiment, "split": split, "head": head,
               "reported": head == heads[0], "runs": len(runs),
               "seeds": " ".join(str(s) for s in sorted(run.seed for run in runs))}
        for group in GROUPS:
            row[f"{group}_mean"], row[f"{group}_std"] = mean_std(
                [100 * run.final[metric_key(split, head, group)] for run in runs])
        figures, source = published if published and is_get and head == "visual" else ({}, "")
        row.update({f"published_{group}": figures.get(group, math.nan) for group in GROUPS})
        row["published_source"] = source
        rows.append(row)
    return rows


def group_notes(groups: dict[tuple[str, str], list[RunRecord]]) -> list[str]:
    """Warnings about runs grouped together that perhaps should not be: a seed twice, or flags
    that differ (beyond the seed and where the runs ran)."""
    notes = []
    for (dataset, experiment), runs in groups.items():
        seeds = [run.seed for run in runs]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            notes.append(f"{dataset} / {experiment}: seed(s) {repeated} appear in more than one run.")
        keys = sorted({k for run in runs for k in run.config} - PER_RUN_FLAGS)
        differing = [k for k in keys if len({json.dumps(run.config.get(k)) for run in runs}) > 1]
        if differing:
            values = {k: ", ".join(sorted({json.dumps(run.config.get(k)) for run in runs})) for k in differing}
            notes.append(f"{dataset} / {experiment}: the runs differ in "
                         + ", ".join(f"--{k} ({v})" for k, v in values.items()))
    return notes


def format_cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def format_markdown(rows: list[dict], split: str, notes: list[str], extra: list[str] | None = None) -> str:
    """A table per dataset: experiment, head, runs, seeds, All, Old, New, published All; then
    the lines ``extra`` and the notes."""
    protocol = "transductive: the unlabelled training images" if split == "train_unlabelled" else \
        "inductive: the test split"
    lines = [f"# GET results: {split} ({protocol})", "",
             "Accuracy in %, mean ± standard deviation (n − 1) over runs; Hungarian-matched All / Old / New. "
             "**reported**: the head a paper reports (GET's paper: the visual head at the last epoch); the "
             "others are diagnostics.", ""]
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        own = [row for row in rows if row["dataset"] == dataset]
        lines += [f"## {dataset}", "", "| experiment | head | runs | seeds | All | Old | New | published All / Old / New |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['experiment']} | {head_cell(r)} | {r['runs']} | {r['seeds']} | "
                  f"{format_cell(r['all_mean'], r['all_std'])} | {format_cell(r['old_mean'], r['old_std'])} | "
                  f"{format_cell(r['new_mean'], r['new_std'])} | {published_cell(r)} |"
                  for r in own]
        sources = sorted({r["published_source"] for r in own if r["published_source"]})
        lines += [""] + [f"Published: {source}" for source in sources] + ([""] if sources else [])
    lines += extra or []
    if notes:
        lines += ["Notes:", ""] + [f"* {note}" for note in notes] + [""]
    return "\n".join(lines)


def head_cell(row: dict) -> str:
    return f"**{row['head']}** (reported)" if row["reported"] else row["head"]


def published_cell(row: dict) -> str:
    """The published figures of a row: All, or All / Old / New where Old and New are known."""
    figures = [row[f"published_{group}"] for group in GROUPS]
    if math.isnan(figures[0]):
        return ""
    return " / ".join(f"{f:.1f}" for f in figures) if not any(map(math.isnan, figures)) else f"{figures[0]:.1f}"


def ablation_change(config: dict) -> str:
    """The flags of an ablation run that differ from GET's values ('GET' where none do)."""
    changed = [f"--{flag} {config[flag]}" for flag, value in ABLATION_FLAGS.items()
               if flag in config and config[flag] != value]
    return " ".join(changed) or "GET"


def format_ablation(rows: list[dict], groups: dict[tuple[str, str], list[RunRecord]]) -> list[str]:
    """Markdown lines: per dataset, one row per experiment: what it changes from GET, its
    reported head's All / Old / New (mean ± std), the change of All from ``ABLATION_BASE``'s
    (where there is one) and the other heads' All as diagnostics."""
    lines = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        own = [row for row in rows if row["dataset"] == dataset]
        reported = {row["experiment"]: row for row in own if row["reported"]}
        base = reported.get(ABLATION_BASE)
        lines += [f"## Ablation: {dataset}", "",
                  "| experiment | changes from GET | head | runs | All | Old | New | Δ All vs GET | text All | fused All |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for experiment, row in reported.items():
            others = {r["head"]: format_cell(r["all_mean"], r["all_std"]) for r in own
                      if r["experiment"] == experiment and not r["reported"]}
            delta = "" if base is None or experiment == ABLATION_BASE else f"{row['all_mean'] - base['all_mean']:+.1f}"
            lines.append(f"| {experiment} | {ablation_change(groups[dataset, experiment][0].config)} | {row['head']} | "
                         f"{row['runs']} | {format_cell(row['all_mean'], row['all_std'])} | "
                         f"{format_cell(row['old_mean'], row['old_std'])} | {format_cell(row['new_mean'], row['new_std'])} | "
                         f"{delta} | {others.get('text', '')} | {others.get('fused', '')} |")
        lines.append("")
    return lines


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else
                             (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


# One run's confusion matrices of the report's split: {head: Confusion} (views/confusion.py),
# empty where the run saved none (no ground truth, or made before they were saved).
RunMatrices = tuple[RunRecord, dict[str, confusion.Confusion]]


def read_confusions(groups: dict[tuple[str, str], list[RunRecord]],
                    split: str) -> dict[tuple[str, str], list[RunMatrices]]:
    """{(dataset, experiment): [(run, its confusion matrices of ``split``)]}."""
    return {key: [(run, confusion.read_run(run.dir, CONFUSION_DIR, split)) for run in runs]
            for key, runs in groups.items()}


def confusion_png(out_dir: Path, run: RunRecord, split: str, head: str) -> Path:
    return (out_dir / "plots" / "confusion" / f"{run.dataset}_{run.experiment}"
            / f"{run.dir.name}_{split}_{head}.png")


def format_confusions(confusions: dict[tuple[str, str], list[RunMatrices]], split: str, out_dir: Path,
                      plots: bool) -> list[str]:
    """Markdown lines: per experiment, each head's most confused class pairs pooled over its runs;
    with ``plots``, links to each run's heat maps. None where no run saved a matrix."""
    lines = []
    for (dataset, experiment), runs in confusions.items():
        found = [(run, matrices) for run, matrices in runs if matrices]
        if not found:
            continue
        lines += [f"### {dataset} / {experiment}", "",
                  "True class → the class whose matched cluster took its images: images / images of the true "
                  f"class (share), summed over {len(found)} of {len(runs)} run(s), each under its own matching.",
                  ""]
        lines += confusion.pairs_table({head: [m[head] for _, m in found if head in m] for head in HEADS
                                        if any(head in m for _, m in found)})
        if plots:
            lines += ["", "Confusion matrices (true classes × matched clusters, rows normalised):", ""]
            lines += [f"* seed {run.seed} (`{run.dir.name}`): " + " · ".join(
                f"[{head}]({confusion_png(out_dir, run, split, head).relative_to(out_dir).as_posix()})"
                for head in matrices) for run, matrices in found]
        lines.append("")
    return [f"## Most confused classes: {split}", ""] + lines if lines else []


def draw_confusions(confusions: dict[tuple[str, str], list[RunMatrices]], split: str, out_dir: Path) -> list[Path]:
    """Each run's confusion matrices redrawn from its files (at ``confusion_png``); their paths."""
    drawn = []
    for runs in confusions.values():
        for run, matrices in runs:
            for head, matrix in matrices.items():
                title = f"{run.dir.name}\n" + confusion.title_of(split, head, matrix, run.config.get("eval_func", "v2"))
                drawn.append(confusion.draw(matrix, title, confusion_png(out_dir, run, split, head)))
    return drawn


def read_curves(run: RunRecord) -> dict[str, dict[int, float]]:
    """{'<split>/<head>/<group>': {epoch (1-based): accuracy %}} of the evaluated stage-2 epochs."""
    curves: dict[str, dict[int, float]] = {}
    path = run.dir / "metrics.jsonl"
    if not path.is_file():
        return curves
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed writer
        if record.get("stage") != STAGE2:
            continue
        for key, value in record.get("eval", {}).items():
            if parse_metric_key(key):
                curves.setdefault(key, {})[record["epoch"] + 1] = 100 * value
    return curves


def plot_group(runs: list[RunRecord], dataset: str, experiment: str, folder: Path) -> Path | None:
    """All / Old / New per head over epochs, mean over the runs and a ± std band; one row of
    panels per split that was evaluated in some epoch. Returns the PNG's path (None: nothing
    to draw)."""
    try:
        import matplotlib
    except ImportError as err:
        raise InputError("--plots needs matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = [read_curves(run) for run in runs]
    splits = [s for s in SPLITS if any(key.startswith(s + "/") for c in curves for key in c)]
    if not splits:
        return None
    fig, axes = plt.subplots(len(splits), len(HEADS), figsize=(4.2 * len(HEADS), 3.2 * len(splits)),
                             squeeze=False, sharex=True, sharey=True)
    for row, split in enumerate(splits):
        for col, head in enumerate(HEADS):
            ax = axes[row][col]
            for group, colour in zip(GROUPS, ("black", "tab:blue", "tab:orange")):
                per_run = [c.get(metric_key(split, head, group), {}) for c in curves]
                epochs = sorted({e for c in per_run for e in c})
                stats = [mean_std([c[e] for c in per_run if e in c]) for e in epochs]
                mean = [m for m, _ in stats]
                std = [0.0 if math.isnan(s) else s for _, s in stats]
                # A band for curves; an error bar for a split evaluated once (e.g. at the end only).
                ax.errorbar(epochs, mean, yerr=std if len(epochs) == 1 else None, marker="o", markersize=3,
                            capsize=3, color=colour, label=group.capitalize())
                ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=colour, alpha=0.15, linewidth=0)
            ax.set_title(f"{split} / {head}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("accuracy (%)")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    axes[0][0].legend()
    fig.suptitle(f"{dataset} / {experiment} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset}_{experiment}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_run_gallery(opts: argparse.Namespace) -> Path:
    """The gallery of run ``opts.gallery``, by views/trained_run.py (imported only here: it loads
    open_clip and the model, which the tables do not need); returns its index.html."""
    from views.trained_run import gallery_of_run
    from util.logging_utils import setup_logging

    setup_logging(None)  # what the model's machinery reports: the matching, unreadable images, the page
    run = Path(opts.gallery)
    if run.is_dir():
        found = [run / name for name in ("last.pt", "best.pt") if (run / name).is_file()]
        if not found:
            raise FileNotFoundError(f"--gallery {run}: no last.pt or best.pt in this folder (a run that "
                                    "finished stage 2 has them)")
        checkpoint = found[0]
    elif run.is_file():
        checkpoint, run = run, run.parent
    else:
        raise FileNotFoundError(f"--gallery {run}: no such run folder or checkpoint")
    folder, flag = (Path(opts.gallery_out), "--gallery_out") if opts.gallery_out else (run / "gallery", "--gallery")
    return gallery_of_run(str(checkpoint), folder, flag, per_cluster=opts.gallery_per_cluster,
                          name_candidates=opts.name_candidates, pretrained=opts.pretrained,
                          data_root=opts.data_root, device=opts.device)


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
