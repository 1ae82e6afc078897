"""N processes compute the loss of one process (docs/method.md, "Precision and several
processes"): two Gloo processes on the CPU, each with half of one fixed global batch, give
the loss terms of a single process on the whole batch, and after DistributedDataParallel's
average the same gradient of every trainable parameter, in both stages; and a demo run on two
machines (two torchrun agents over localhost, joined by the c10d rendezvous) logs the losses
of one process, with rank 0 alone writing the run folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import pytest
import torch.multiprocessing as mp

import model
import train
from backbone import load_clip
from methods.get import GETStep
from methods.tes import TESStep
from bench.demo_seeds import demo_flags
from tests.helpers import trainable_weights
from tests.test_reliability import REPO, free_port, python_env
from util.dist import DistInfo, wrap_ddp

B, K, WORLD = 6, 6, 2  # global batch (samples), classes, processes


def global_batch() -> dict[str, torch.Tensor]:
    """2B rows, view 1 of the B samples then view 2; some labelled rows of repeated classes."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 4, 2, 5]).repeat(2)
    labelled = torch.tensor([True, True, True, False, True, False]).repeat(2)
    return {"images": torch.randn(2 * B, 3, 32, 32, generator=gen), "labels": labels,
            "labelled": labelled}


def rows_of(rank: int, world: int) -> torch.Tensor:
    """Row indices of process ``rank``'s share: its slice of view 1, then of view 2."""
    per = B // world
    first = torch.arange(rank * per, (rank + 1) * per)
    return torch.cat([first, first + B])


def build(stage: int) -> model._PartlyTrainable:
    torch.manual_seed(0)
    clip = load_clip("GET-tiny", pretrained=None)
    torch.manual_seed(1)
    tes = model.TextEmbeddingSynthesizer(clip)
    if stage == 1:
        return model.TESStage(clip, tes)
    torch.manual_seed(2)
    return model.GETModel(clip, tes, K, grad_from_block=2)


def stage_loss(stage: int, net, batch: dict, info: DistInfo):
    """The step of train.py's stage ``stage`` on this process's rows (gathered if several)."""
    if stage == 1:
        class_text = torch.nn.functional.normalize(
            torch.randn(K, 32, generator=torch.Generator().manual_seed(5)), dim=-1)
        step = TESStep(net, class_text, 100.0, info)
    else:
        step = GETStep(net, info, teacher_temp=lambda epoch: 0.05, weights={"memax_weight": 2.0})
    return step(batch["images"], batch["labels"], batch["labelled"], 0, 0)


def step(stage: int, info: DistInfo) -> dict[str, torch.Tensor]:
    """Loss terms and trainable-parameter gradients of one step."""
    net = build(stage)
    batch = {k: v[rows_of(info.rank, info.world_size)] for k, v in global_batch().items()}
    ddp = wrap_ddp(net, info)  # held until after backward: its hooks average the gradients
    loss, parts = stage_loss(stage, ddp, batch, info)
    loss.backward()
    grads = {f"grad/{n}": p.grad for n, p in net.named_parameters() if p.grad is not None}
    return {"loss/total": loss.detach(), **{f"loss/{k}": v for k, v in parts.items()}, **grads}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        info = DistInfo(rank=rank, world_size=WORLD, local_rank=rank)
        torch.save({stage: step(stage, info) for stage in (1, 2)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_loss_and_gradients_of_one(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for stage in (1, 2):
        single = step(stage, DistInfo())
        assert any(k.startswith("grad/") for k in single)
        for rank in range(WORLD):
            ddp = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[stage]
            assert ddp.keys() == single.keys()
            for key, value in single.items():
                torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6, msg=f"{stage} {key}")


def epoch_losses(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["stage"], r["epoch"]): r["loss"] for r in records}


def start_nodes(argv: list[str], out_dir, nodes: int = 2) -> list[tuple[subprocess.Popen, object]]:
    """train.py on ``nodes`` machines of one process each, as a cluster runs it: one torchrun
    agent per machine (here all on localhost), every one with the same command, joined by the
    c10d rendezvous that the first one to arrive hosts; no machine is given a rank. The agents
    and their log files, running."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "test",
           str(REPO / "train.py"), *argv]
    logs = [open(out_dir / f"node{node}.log", "w+") for node in range(nodes)]
    return [(subprocess.Popen(cmd, cwd=REPO, env=python_env(), stdout=log, stderr=subprocess.STDOUT), log)
            for log in logs]


def wait_nodes(agents: list[tuple[subprocess.Popen, object]]) -> None:
    try:
        codes = [agent.wait(timeout=300) for agent, _ in agents]
    finally:
        outputs = []
        for agent, log in agents:
            agent.kill()
            log.seek(0)
            outputs.append(log.read()[-3000:])
            log.close()
    assert codes == [0] * len(agents), "\n".join(outputs)


def test_two_node_demo_run_logs_the_losses_of_one_process(tmp_path):
    # Two machines of one process each rather than one machine of two processes: the same
    # global batch split in two, but through the rendezvous a cluster uses (two processes on
    # one machine: tests/test_reliability.py).
    # With word dropout: each step's mask is drawn for the global batch, not per process.
    flags = demo_flags() + ["--tes_epochs", "1", "--epochs", "1", "--max_steps_per_epoch", "3",
                            "--word_drop", "0.5", "--exp_root", str(tmp_path), "--no-progress"]
    agents = start_nodes(flags + ["--exp_name", "two"], tmp_path)
    try:  # the one-process run meanwhile: the agents wait much of their time
        train.main(flags + ["--exp_name", "one"])
    finally:
        wait_nodes(agents)
    (two,), (one,) = (list((tmp_path / "digits").glob(f"{name}-*")) for name in ("two", "one"))
    # Rank 0 alone writes: one folder, the files of a one-process run, each log line once.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len(list((two / "tensorboard").iterdir())) == len(list((one / "tensorboard").iterdir()))
    assert (two / "log.txt").read_text().count("stage 1 done") == 1
    two_losses, one_losses = epoch_losses(two), epoch_losses(one)
    assert two_losses.keys() == one_losses.keys() == {("tes", 0), ("get", 0)}
    for key, losses in one_losses.items():
        assert two_losses[key].keys() == losses.keys()
        for term, value in losses.items():
            assert two_losses[key][term] == pytest.approx(value, rel=1e-4), (key, term)
    # Equal up to the order in which the collectives sum (measured: 7.2e-7 at most), not bit for bit.
    a, b = (trainable_weights(run / "last.pt") for run in (two, one))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
