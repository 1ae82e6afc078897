"""The demo over many seeds: how much a GET result moves with the seed, and how often a run
collapses (two new classes in one cluster, another split in two).

    python bench/demo_seeds.py                      # seeds 0-9, two runs at a time
    python bench/demo_seeds.py --seeds 20 --jobs 2 --json demo_seeds.json
    python bench/demo_seeds.py --repo ../other-checkout   # the same measurement of another tree

Each seed is a full run of scripts/run_demo.sh's train.py command (both stages), one thread per
run. Prints, per head and group of the unlabelled training images (the paper's split), min /
mean / std / max over the seeds and the number of collapsed runs, then one row per seed. A run
counts as collapsed when its visual New accuracy is more than ``--collapse_gap`` below the
median of all runs: collapsed runs lose a whole class or more (1 of 5 new classes is 0.2 of
New), ordinary seed noise stays within a few hundredths.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADS = ("visual", "text", "fused")
GROUPS = ("all", "old", "new")
SPLIT = "train_unlabelled"


def demo_flags(repo: Path = REPO) -> list[str]:
    """The train.py flags of ``repo``'s scripts/run_demo.sh; its --pretrained path is taken
    from the repository root, where the script runs."""
    text = (repo / "scripts" / "run_demo.sh").read_text().replace("\\\n", " ")
    command = next(line for line in text.splitlines() if line.startswith('"$PY" train.py'))
    words = shlex.split(command.split("train.py", 1)[1])
    words = words[:words.index("$@")]  # the user's extra flags, and what the script does with the output
    weights = words.index("--pretrained") + 1
    words[weights] = str(repo / words[weights])
    return words


def run_seed(repo: Path, seed: int, out: Path, extra: list[str]) -> dict:
    """One demo run of ``repo`` with ``--seed seed``: its final metrics and wall time."""
    command = [sys.executable, str(repo / "train.py"), *demo_flags(repo), *extra, "--seed", str(seed),
               "--exp_root", str(out), "--exp_name", f"seed{seed}", "--no-progress"]
    start = time.time()
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"seed {seed} failed:\n{done.stderr[-3000:]}")
    (run_dir,) = (out / "digits").glob(f"seed{seed}-*")
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    return {"seed": seed, "seconds": round(time.time() - start, 1),
            **{f"{head}/{group}": metrics[f"{SPLIT}/{head}/{group}"] for head in HEADS for group in GROUPS}}


def summarise(runs: list[dict], collapse_gap: float) -> dict:
    """min / mean / std / max of every head and group over the runs, and the collapsed seeds."""
    stats = {}
    for key in (f"{head}/{group}" for head in HEADS for group in GROUPS):
        values = [run[key] for run in runs]
        stats[key] = {"min": min(values), "mean": statistics.fmean(values), "max": max(values),
                      "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    median_new = statistics.median(run["visual/new"] for run in runs)
    collapsed = [run["seed"] for run in runs if run["visual/new"] < median_new - collapse_gap]
    return {"stats": stats, "median_visual_new": median_new, "collapsed": collapsed}


def table(runs: list[dict], summary: dict) -> str:
    lines = [f"| head | group | min | mean ± std | max | collapsed ({len(runs)} seeds) |",
             "|---|---|---:|---:|---:|---:|"]
    for head in HEADS:
        for group in GROUPS:
            s = summary["stats"][f"{head}/{group}"]
            lines.append(f"| {head} | {group} | {s['min']:.4f} | {s['mean']:.4f} ± {s['std']:.4f} | "
                         f"{s['max']:.4f} | {len(summary['collapsed']) if (head, group) == ('visual', 'new') else ''} |")
    lines += ["", "| seed | visual All/Old/New | text All/Old/New | fused All/Old/New | collapsed | s |",
              "|---:|---|---|---|---|---:|"]
    for run in runs:
        cells = ["/".join(f"{run[f'{head}/{group}']:.4f}" for group in GROUPS) for head in HEADS]
        lines.append(f"| {run['seed']} | " + " | ".join(cells)
                     + f" | {'yes' if run['seed'] in summary['collapsed'] else ''} | {run['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10, help="number of seeds")
    p.add_argument("--first_seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose demo is run")
    p.add_argument("--collapse_gap", type=float, default=0.1,
                   help="a run collapsed when its visual New is this far below the median")
    p.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="write the runs and the summary here")
    args, extra = p.parse_known_args(argv)  # anything else goes to train.py
    if args.seeds < 1 or args.jobs < 1:
        p.error("--seeds and --jobs must be >= 1")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda s: run_seed(args.repo.resolve(), s, out, extra), seeds))
    summary = summarise(runs, args.collapse_gap)
    print(f"demo of {args.repo.resolve()}, {len(runs)} seeds, unlabelled training images "
          f"(collapsed: visual New more than {args.collapse_gap} below the median "
          f"{summary['median_visual_new']:.4f})\n")
    print(table(runs, summary))
    result = {"repo": str(args.repo.resolve()), "extra_flags": extra, "runs": runs, **summary}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
