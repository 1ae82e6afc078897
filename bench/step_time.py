"""Step time, throughput, FLOPs and peak memory: the optimised computation against the
straightforward one of the reference, on the real ViT-B/16 architecture (random weights).

    python bench/step_time.py                              # CPU defaults: a few minutes on 2 cores
    python bench/step_time.py --device cuda --batch_size 128 --amp --steps 10
    python bench/step_time.py --memory_kinds stage1,stage2,eval      # peak memory of every step

Optimised (``model.py``, what train.py runs): one frozen image-encoder pass per image in
stage 1; in stage 2 and evaluation the frozen blocks [0, grad_from_block) run once and feed both
the trainable block and a frozen copy of it (TES input); one CLIP in memory. Straightforward
(``bench/reference.py``, the reference's computation): two image-encoder passes per image and
the reference's three CLIP copies. ``--amp`` is the models' own bf16 autocast of the CLIP
encoders; heads and losses run in fp32 on both paths.
Timings alternate A B A B after a warm-up, in one process; peak memory is measured in a
fresh subprocess per path so that one path's models do not count against the other.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.reference import ReferenceGETModel, ReferenceTESStage  # noqa: E402
from methods.get import dual_branch_loss  # noqa: E402
from methods.tes import tes_loss  # noqa: E402
from backbone import load_clip  # noqa: E402
from config import vision_depth, vision_image_size  # noqa: E402
from model import GETModel, TESStage, TextEmbeddingSynthesizer  # noqa: E402

KINDS = ("stage1", "stage2", "eval")
# path -> (stage-1 model, stage-2 model)
PATHS = {"optimised": (TESStage, GETModel), "straightforward": (ReferenceTESStage, ReferenceGETModel)}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clip_model", default="ViT-B-16")
    p.add_argument("--batch_size", type=int, default=4, help="samples per step (2 views each)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per path (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--grad_from_block", type=int, default=None,
                   help="first trainable block (default: the last one, 11 for ViT-B-16)")
    p.add_argument("--num_classes", type=int, default=200)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast of the CLIP encoders (the models' amp argument)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure stage-2 peak memory per path in subprocesses")
    p.add_argument("--memory_kinds", default="stage2",
                   help="comma-separated steps whose peak memory --memory measures, each path in a fresh "
                        "process (default stage2; with more, e.g. stage1,stage2,eval, the probes run "
                        "at once and the JSON gains peak_memory_mib)")
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                   help="count FLOPs per image of each path (one extra step each)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--memory_probe", default=None, help=argparse.SUPPRESS)  # internal: 'path'
    p.add_argument("--memory_kind", default="stage2", choices=KINDS, help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    bad = set(args.memory_kinds.split(",")) - set(KINDS)
    if bad:
        p.error(f"--memory_kinds: unknown {', '.join(sorted(bad))}; choose from {','.join(KINDS)}")
    if args.grad_from_block is None:
        args.grad_from_block = vision_depth(args.clip_model) - 1
    return args


# ----------------------------------------------------------------------------- workloads
class Workload:
    """One path's model and optimiser for one stage, and its step functions.

    Stage 1 gets a CLIP of its own: building the stage-2 model makes the last block trainable,
    which would give stage 1's straightforward path gradients it never has in train.py.
    """

    def __init__(self, clip, stage: int, path: str, args):
        self.args, self.device = args, torch.device(args.device)
        tes = TextEmbeddingSynthesizer(clip)
        stage1_model, stage2_model = PATHS[path]
        if stage == 1:
            self.model = stage1_model(clip, tes, amp=args.amp)
            params = tes.projector.parameters()
        else:
            self.model = stage2_model(clip, tes, args.num_classes,
                                      grad_from_block=args.grad_from_block, amp=args.amp)
            params = self.model.trainable_parameters()
        self.optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        self.class_text = torch.nn.functional.normalize(
            torch.randn(args.num_classes // 2, clip.visual.output_dim, device=self.device), dim=-1)

    def step(self, kind: str, batch: dict) -> None:
        getattr(self, kind)(batch)

    def stage1(self, b: dict) -> None:
        f, t = self.model(b["images"])  # float32
        loss, _ = tes_loss(f, t, 100.0, b["labels"], b["labelled"], self.class_text)
        self.update(loss)

    def stage2(self, b: dict) -> None:
        out = self.model(b["images"])  # float32
        loss, _ = dual_branch_loss(out, b["labels"], b["labelled"], teacher_temp=0.07)
        self.update(loss)

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def eval(self, b: dict) -> None:
        """What evaluation does per batch: predict, then each head's cluster to the host."""
        self.model.eval()
        out = self.model.predict(b["images"])
        [logits.argmax(1).cpu() for logits in out.values()]
        self.model.train()

    def model_work(self, kind: str, b: dict) -> None:
        """The model's own work in a step of ``kind``, nothing around it: stage 1 one frozen
        image-encoder pass and the TES forward and backward; stage 2 the model's forward and
        backward (no loss terms, no update); evaluation the prediction alone."""
        if kind == "eval":
            self.model.eval()
            with torch.no_grad():
                self.model.predict(b["images"])
            self.model.train()
            return
        if kind == "stage1":
            outputs = [self.model(b["images"])[1]]  # the TES output t (f comes without autograd)
        else:
            outputs = list(self.model(b["images"]).values())
        sum(out.float().sum() for out in outputs).backward()


def build_workloads(args, stage: int) -> dict[str, Workload]:
    torch.manual_seed(0)
    clip = load_clip(args.clip_model, None, device=args.device)
    return {path: Workload(clip, stage, path, args) for path in PATHS}


def make_batch(args, image_size: int, kind: str) -> dict:
    g = torch.Generator().manual_seed(0)
    n = args.batch_size if kind == "eval" else 2 * args.batch_size  # eval: one view
    labelled = (torch.arange(args.batch_size) % 2 == 0).repeat(2)
    labels = torch.randint(0, args.num_classes // 2, (args.batch_size,), generator=g).repeat(2)
    return {"images": torch.randn(n, 3, image_size, image_size, generator=g).to(args.device),
            "labels": labels.to(args.device), "labelled": labelled.to(args.device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def count_flops(work: Workload, kind: str, batch: dict) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        work.step(kind, batch)
    return counter.get_total_flops() / batch["images"].shape[0]


# ----------------------------------------------------------------------------- memory
def probe_command(args, path: str, kind: str = "stage2") -> list[str]:
    """The command of a fresh process that measures the peak memory of ``kind`` steps of ``path``."""
    return [sys.executable, __file__, "--memory_probe", path, "--memory_kind", kind, "--device", args.device,
            "--clip_model", args.clip_model, "--batch_size", str(args.batch_size),
            "--grad_from_block", str(args.grad_from_block), "--num_classes", str(args.num_classes),
            "--amp" if args.amp else "--no-amp"]


def peak_memory_of_path(args, path: str) -> float:
    """Peak memory (MiB) of stage-2 steps of one path, in a fresh process."""
    out = subprocess.run(probe_command(args, path), capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def peak_memory_of_kinds(args, kinds: list[str]) -> dict[str, dict[str, float]]:
    """{kind: {path: peak MiB, "ratio": optimised / straightforward}}, every (kind, path) in a
    fresh process of its own, all at once (each process measures only itself)."""
    probes = {(kind, path): subprocess.Popen(probe_command(args, path, kind), stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)
              for kind in kinds for path in PATHS}
    mem: dict[str, dict[str, float]] = {kind: {} for kind in kinds}
    for (kind, path), probe in probes.items():
        stdout, stderr = probe.communicate()
        if probe.returncode:
            raise subprocess.CalledProcessError(probe.returncode, probe.args, stdout, stderr)
        mem[kind][path] = float(stdout.strip().splitlines()[-1])
    for row in mem.values():
        row["ratio"] = row["optimised"] / row["straightforward"]
    return mem


def memory_probe(args) -> None:
    """Build one path and run two steps of ``--memory_kind`` (stage 2 by default); print the
    peak: CUDA max allocated, or on CPU the peak resident set size above the process's size
    before CLIP was built."""
    device = torch.device(args.device)
    base_kib = proc_status_kib("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clip = load_clip(args.clip_model, None, device=args.device)
    kind = args.memory_kind
    work = Workload(clip, 1 if kind == "stage1" else 2, args.memory_probe, args)
    batch = make_batch(args, vision_image_size(args.clip_model), kind)
    for _ in range(2):
        work.step(kind, batch)
    sync(device)
    if device.type == "cuda":
        print(torch.cuda.max_memory_allocated(device) / 2**20)
    else:
        print((proc_status_kib("VmHWM") - base_kib) / 1024)


def proc_status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB. Not ru_maxrss: on Linux that keeps
    the parent's peak across fork + exec, which would hide the child's own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (CPU memory is measured on Linux only)")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    if args.memory_probe:
        memory_probe(args)
        return
    device = torch.device(args.device)
    image_size = vision_image_size(args.clip_model)
    internal = {"memory_probe": True, "memory_kind": True, "memory_kinds": args.memory_kinds == "stage2"}
    results = {"machine": machine(device), "args": {k: v for k, v in vars(args).items() if not internal.get(k)}}
    works, works_stage = None, None
    for kind in args.kinds.split(","):
        stage = 1 if kind == "stage1" else 2
        if works_stage != stage:
            works, works_stage = None, stage  # free the previous stage's models first
            works = build_workloads(args, stage)
        batch = make_batch(args, image_size, kind)
        times = {name: [] for name in PATHS}
        for _ in range(args.warmup):
            for name, work in works.items():
                work.step(kind, batch)
        model_work = []  # the optimised step's model work alone, measured beside it
        for _ in range(args.steps):  # A B A B: drifts of the machine hit both paths alike
            for name, work in works.items():
                times[name].append(timed(lambda: work.step(kind, batch), device))
            model_work.append(timed(lambda: works["optimised"].model_work(kind, batch), device))
            works["optimised"].optimizer.zero_grad(set_to_none=True)
        row = {"model_work_seconds": statistics.median(model_work)}
        for name in PATHS:
            med = statistics.median(times[name])
            row[name] = {"seconds": med, "images_per_s": batch["images"].shape[0] / med,
                         "all_seconds": times[name]}
            if args.flops:
                row[name]["gflops_per_image"] = count_flops(works[name], kind, batch) / 1e9
        row["speedup"] = row["straightforward"]["seconds"] / row["optimised"]["seconds"]
        row["step_over_model_work"] = row["optimised"]["seconds"] / row["model_work_seconds"]
        if args.flops:
            row["flop_ratio"] = (row["straightforward"]["gflops_per_image"]
                                 / row["optimised"]["gflops_per_image"])
        results[kind] = row
        print_row(kind, row, args.flops)
    if args.memory:
        del works
        unit = "CUDA max allocated" if device.type == "cuda" else "peak RSS above start"
        memory_kinds = args.memory_kinds.split(",")
        if memory_kinds == ["stage2"]:
            mem = {name: peak_memory_of_path(args, name) for name in PATHS}
            mem["ratio"] = mem["optimised"] / mem["straightforward"]
        else:
            results["peak_memory_mib"] = by_kind = peak_memory_of_kinds(args, memory_kinds)
            for kind in (k for k in memory_kinds if k != "stage2"):
                row = by_kind[kind]
                print(f"\n{kind} peak memory ({unit}): optimised {row['optimised']:.0f} MiB, "
                      f"straightforward {row['straightforward']:.0f} MiB, ratio {row['ratio']:.2f}")
            mem = by_kind.get("stage2")
        if mem is not None:
            results["stage2_peak_memory_mib"] = mem
            print(f"\nstage-2 peak memory ({unit}): optimised {mem['optimised']:.0f} MiB, "
                  f"straightforward {mem['straightforward']:.0f} MiB, ratio {mem['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def print_row(kind: str, row: dict, flops: bool) -> None:
    if kind == KINDS[0] or not getattr(print_row, "header", False):
        print(f"\n{'step':<8}{'path':<17}{'median s':>10}{'images/s':>10}"
              + (f"{'GFLOP/img':>11}" if flops else "") + f"{'ratio':>8}")
        print_row.header = True
    for name in PATHS:
        r = row[name]
        ratio = f"{row['speedup']:.2f}x" if name == "optimised" else ""
        print(f"{kind:<8}{name:<17}{r['seconds']:>10.3f}{r['images_per_s']:>10.1f}"
              + (f"{r['gflops_per_image']:>11.2f}" if flops else "") + f"{ratio:>8}")
    if flops:
        print(f"{'':<8}{'FLOP ratio (ceiling of the speed-up)':<45}{row['flop_ratio']:.2f}x")
    print(f"{'':<8}{'optimised step / its model work alone':<45}{row['step_over_model_work']:.2f}x "
          f"({row['model_work_seconds']:.3f} s)")


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


if __name__ == "__main__":
    main()
