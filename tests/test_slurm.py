"""scripts/slurm/: a job that SLURM signals before its time limit saves, requeues itself and
resumes exactly; a pre-empted one (SIGTERM to every process) saves too. SLURM itself is played
by the test: stand-ins for sbatch, srun, scontrol and scancel on PATH record what the scripts
ask of them, and the test starts the batch script as SLURM would, with its environment and
signals. The scripts are the real ones, and so is the training of the end-to-end test (one
process on the CPU); the multi-node tests put a stand-in Python in its place, which records
the torchrun command of each node."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import methods.get
import train
from tests.helpers import run_dirs, tiny_argv, trainable_weights
from util.signals import StopSignal

REPO = Path(__file__).resolve().parents[1]
JOB_ID = "4242"

# SLURM's commands, as far as the scripts use them. Each appends what it was asked to calls.
FAKES = {
    "sbatch": """
printf '%s\\n' "$@" > "$FAKE_SLURM/submitted"
echo "Submitted batch job 4242"
""",
    "scontrol": """
echo "scontrol $*" >> "$FAKE_SLURM/calls"
case "$1" in
    show) tr ',' '\\n' <<< "$3" ;;  # show hostnames a,b: one name a line
    requeue) ;;
    *) exit 1 ;;
esac
""",
    # Signals every process of the job's steps (here: the tasks the stand-in srun started).
    "scancel": """
echo "scancel $*" >> "$FAKE_SLURM/calls"
kill "-${1#--signal=}" $(cat "$FAKE_SLURM/tasks")
""",
    # One task a node, all here, numbered as SLURM does.
    "srun": """
echo "srun $*" >> "$FAKE_SLURM/calls"
while [[ "$1" == -* ]]; do
    case "$1" in --nodes|--ntasks-per-node|--cpus-per-task) shift 2 ;; *) shift ;; esac
done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=($!)
    echo $! >> "$FAKE_SLURM/tasks"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
""",
}


def fake_slurm(tmp_path: Path) -> dict:
    """The stand-ins in a folder first on PATH; the environment that finds them."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM": str(state),
            "GET_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def calls(env: dict) -> list[str]:
    path = Path(env["FAKE_SLURM"]) / "calls"
    return path.read_text().splitlines() if path.is_file() else []


def submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "submit.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


class Job:
    """What sbatch was given: its options, the batch script and its arguments."""

    def __init__(self, env: dict):
        words = (Path(env["FAKE_SLURM"]) / "submitted").read_text().splitlines()
        script = next(i for i, word in enumerate(words) if word.endswith(".sbatch"))
        self.options, self.script, self.args = words[:script], Path(words[script]), words[script + 1:]
        self.directives = re.findall(r"^#SBATCH (\S+)", self.script.read_text(), re.M)

    def option(self, name: str) -> str:
        return self.options[self.options.index(name) + 1]

    def start(self, env: dict, restart: int, nodes: str = "localhost", out: Path | None = None) -> subprocess.Popen:
        """The batch script on the job's first node, as SLURM starts it (the restart count
        says how often it was requeued; --export's variables come along)."""
        exported = dict(pair.split("=", 1) for pair in self.option("--export").split(",")[1:])
        job_env = {**env, **exported, "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NODELIST": nodes,
                   "SLURM_JOB_NUM_NODES": str(len(nodes.split(","))), "SLURM_RESTART_COUNT": str(restart),
                   "SLURM_CPUS_PER_TASK": self.option("--cpus-per-task")}
        with open(out or os.devnull, "w") as log:
            return subprocess.Popen(["bash", str(self.script), *self.args], cwd=self.option("--chdir"),
                                    env=job_env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def jobs():
    """The batch scripts a test starts; whatever of them a failed test left running is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


# ----------------------------------------------------------------- submit.sh and the batch script
def fake_python(tmp_path: Path) -> str:
    """A stand-in for Python that records each torchrun call and stays, as training does,
    until SIGTERM, on which it takes a moment to save (FAKE_TASK=exit: it ends at once)."""
    path = tmp_path / "python"
    path.write_text("""#!/usr/bin/env bash
case "$*" in *torch.distributed.run*) ;; *) exit 0 ;; esac  # the dataset check
trap 'kill $!; sleep 0.3; echo "node=$SLURM_NODEID saved" >> "$FAKE_SLURM/calls"; exit 0' TERM
echo "node=${SLURM_NODEID:-} $*" >> "$FAKE_SLURM/python"
if [ "${FAKE_TASK:-}" = exit ]; then exit 0; fi
sleep 60 & wait
""")
    path.chmod(0o755)
    return str(path)


def torchrun_calls(env: dict) -> list[list[str]]:
    lines = (Path(env["FAKE_SLURM"]) / "python").read_text().splitlines()
    return [shlex.split(line) for line in lines if "torch.distributed.run" in line]


def test_submit_asks_for_the_nodes_gpus_time_signal_and_requeue(tmp_path):
    env = {**fake_slurm(tmp_path), "GET_PYTHON": fake_python(tmp_path)}
    result = submit(env, "cub", "--nodes", "2", "--gpus_per_node", "4", "--time=12:00:00", "--lr", "0.05")
    assert result.returncode == 0, result.stderr
    assert "Submitted batch job 4242" in result.stdout
    job = Job(env)
    assert (job.option("--nodes"), job.option("--gres"), job.option("--time")) == ("2", "gpu:4", "12:00:00")
    assert job.option("--cpus-per-task") == "32" and job.option("--export") == "ALL,NPROC=4"
    assert Path(job.option("--chdir")) == REPO and job.args == ["cub", "--lr", "0.05"]
    # USR1 to the batch script 5 minutes before the limit; the job may be requeued.
    assert {"--signal=B:USR1@300", "--requeue", "--ntasks-per-node=1"} <= set(job.directives)
    assert submit(env, "digits", "--gpus_per_node", "0").returncode == 0  # a CPU job: no GPU asked for
    assert "--gres" not in Job(env).options and Job(env).option("--export") == "ALL,NPROC=1"


@pytest.mark.parametrize("argv, message", [
    ((), "usage"), (("--nodes", "2"), "usage"), (("cub", "--nodes", "0"), "--nodes"),
    (("cub", "--gpus_per_node", "two"), "--gpus_per_node"), (("cub", "--time"), "needs a value"),
    (("mnist",), "Unknown dataset name"),
])
def test_submit_refuses_bad_arguments_before_sbatch(tmp_path, argv, message):
    env = fake_slurm(tmp_path)
    result = submit(env, *argv)
    assert result.returncode != 0 and message in result.stderr
    assert not (Path(env["FAKE_SLURM"]) / "submitted").exists()


def test_multi_node_job_runs_torchrun_on_every_node_and_requeues_after_usr1(tmp_path, jobs):
    env = {**fake_slurm(tmp_path), "GET_PYTHON": fake_python(tmp_path)}
    assert submit(env, "cub", "--nodes", "2", "--gpus_per_node", "4", "--lr", "0.05").returncode == 0
    job = Job(env)
    jobs.append(proc := job.start(env, restart=0, nodes="gpu-a,gpu-b"))
    wait_for(lambda: (Path(env["FAKE_SLURM"]) / "python").is_file() and len(torchrun_calls(env)) == 2,
             proc, "torchrun on both nodes")
    proc.send_signal(signal.SIGUSR1)  # SLURM, 300 s before the time limit (B: the batch script only)
    assert proc.wait(timeout=30) == 0
    port = 29500 + int(JOB_ID) % 10000
    expected = ["-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"gpu-a:{port}", "--rdzv_id", JOB_ID,
                "train.py", "--dataset_name", "cub", "--exp_name", "get", "--lr", "0.05"]  # a new run
    assert sorted(call[0] for call in torchrun_calls(env)) == ["node=0", "node=1"]
    assert all(call[1:] == expected for call in torchrun_calls(env))
    srun, scancel, *saved, requeue = calls(env)[1:]
    assert "--kill-on-bad-exit=0" in srun and "--cpus-per-task 32" in srun
    # The stop request goes to the steps' processes (not to srun, which would kill them); the
    # job requeues itself once they have saved and exited.
    assert (scancel, requeue) == (f"scancel --signal=TERM {JOB_ID}", f"scontrol requeue {JOB_ID}")
    assert sorted(saved) == ["node=0 saved", "node=1 saved"]

    # Requeued: the same command continues the run; it ends on its own, and is not requeued.
    (Path(env["FAKE_SLURM"]) / "python").unlink()
    before = len(calls(env))
    jobs.append(proc := job.start({**env, "FAKE_TASK": "exit"}, restart=1, nodes="gpu-a,gpu-b"))
    assert proc.wait(timeout=30) == 0
    assert all(call[1:] == expected[:-2] + ["--resume", "auto"] + expected[-2:] for call in torchrun_calls(env))
    assert not any(call.startswith("scontrol requeue") for call in calls(env)[before:])


def test_pre_empted_job_lets_the_training_save_and_leaves_the_requeue_to_slurm(tmp_path, jobs):
    env = {**fake_slurm(tmp_path), "GET_PYTHON": fake_python(tmp_path)}
    assert submit(env, "cub", "--gpus_per_node", "2").returncode == 0
    jobs.append(proc := Job(env).start(env, restart=0))
    wait_for(lambda: (Path(env["FAKE_SLURM"]) / "python").is_file() and torchrun_calls(env), proc, "torchrun")
    for pid in [proc.pid, *descendants(proc.pid)]:  # SLURM signals every process of the job
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # a short-lived one (a helper command) ended since it was listed
            pass
    assert proc.wait(timeout=30) == 0  # the batch script waited for the training to save
    # One node: torchrun runs in the batch script, no srun (which would kill it at once); the
    # requeue is SLURM's.
    assert calls(env) == ["scontrol show hostnames localhost", "node= saved"]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (as SLURM's cgroup holds them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# ----------------------------------------------------------------- the real training
def test_a_job_signalled_before_its_time_limit_saves_requeues_and_resumes_exactly(tmp_path, cub_root, jobs):
    out, extra = tmp_path / "out", ("--num_workers", "1", "--log_every", "1")
    env = fake_slurm(tmp_path)
    assert submit(env, "cub", "--gpus_per_node", "0", *tiny_argv(out, cub_root, *extra)[2:]).returncode == 0
    job = Job(env)

    jobs.append(proc := job.start(env, restart=0, out=tmp_path / "job0.out"))
    # The same flags uninterrupted, here, while the job's Python starts (most of its time).
    uninterrupted = ThreadPoolExecutor(1).submit(train.main, tiny_argv(out, cub_root, *extra, exp_name="full"))
    wait_for(lambda: list((out / "cub").glob("t-*/tes.pt")), proc, "stage 2")
    proc.send_signal(signal.SIGUSR1)  # SLURM, before the time limit
    assert proc.wait(timeout=120) == 0, (tmp_path / "job0.out").read_text()[-3000:]
    (run,) = run_dirs(out)
    assert "stopped on request; state saved" in (run / "log.txt").read_text()
    assert not (run / "final_metrics.json").exists()
    assert calls(env) == ["scontrol show hostnames localhost", f"scontrol requeue {JOB_ID}"]

    jobs.append(proc := job.start(env, restart=1, out=tmp_path / "job1.out"))  # SLURM starts the requeued job
    assert proc.wait(timeout=120) == 0, (tmp_path / "job1.out").read_text()[-3000:]
    assert run_dirs(out) == [run]  # continued, not started again
    reference = uninterrupted.result()
    resumed = json.loads((run / "resumes.jsonl").read_text())
    assert resumed["stage"] == "get" and resumed["from"].endswith("last.pt")
    assert json.loads((run / "final_metrics.json").read_text()) == reference
    (full,) = run_dirs(out, "full")
    a, b = trainable_weights(full / "last.pt"), trainable_weights(run / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert calls(env)[2:] == ["scontrol show hostnames localhost"]  # finished: not requeued again


def test_pre_emption_reaches_every_process_and_the_training_still_saves(tmp_path, cub_root, monkeypatch):
    # SLURM's SIGTERM goes to every process of the job: the training process (under torchrun
    # twice, directly and passed on by torchrun) and its data-loading workers. (That the saved
    # state resumes exactly: the test above and tests/test_bad_runs.py.)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", JOB_ID)
    real, seen = methods.get.dual_branch_loss, {"calls": 0}

    def pre_empt_during_second_step(*args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] == 2:
            workers = [pid for pid in descendants(os.getpid()) if cmdline(pid) == cmdline(os.getpid())]
            seen["workers"] = len(workers)
            # From another process, as SLURM's: torch's loading workers take a SIGTERM from the
            # training process for a shutdown, and die of anyone else's.
            subprocess.run(["kill", "-TERM", str(os.getpid()), *map(str, workers)], check=True)
            subprocess.run(["kill", "-TERM", str(os.getpid())], check=True)  # torchrun's copy
        return real(*args, **kwargs)

    monkeypatch.setattr(methods.get, "dual_branch_loss", pre_empt_during_second_step)
    assert train.main(tiny_argv(tmp_path, cub_root, "--num_workers", "1", "--log_every", "1")) == {}  # stopped
    assert seen["workers"] == 1  # the loading worker was signalled too, and lived on
    (run,) = run_dirs(tmp_path)
    loop = torch.load(run / "last.pt", weights_only=True)["loop"]
    assert (loop["epoch"], loop["step_in_epoch"]) == (0, 2)
    assert "the same stop request" in (run / "log.txt").read_text()


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize("torchrun", [False, True])
def test_usr1_asks_to_stop_and_a_copy_under_torchrun_is_the_same_request(torchrun):
    with StopSignal(window=0.5, copies=torchrun) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested
        if not torchrun:  # the same signal again is a second request
            with pytest.raises(SystemExit):
                os.kill(os.getpid(), signal.SIGUSR1)
            return
        os.kill(os.getpid(), signal.SIGUSR1)  # torchrun's copy: still stopping, not exiting
        with pytest.raises(SystemExit):  # a third is a second request
            os.kill(os.getpid(), signal.SIGUSR1)
