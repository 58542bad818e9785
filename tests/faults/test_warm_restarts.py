"""Warm restarts under torchrun: a rank's worker killed (SIGKILL) or hung (SIGSTOP) is replaced by a
fork of its supervisor, the other workers are fenced and forked again, and the run goes on from memory
bit-exactly. torchrun runs with --max-restarts=0, so a run that finishes was never restarted by it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import launch, read_metrics
from resurgo.launch.process_tree import rank_process

STEPS = 14
KILL_AT = 6
BASE = ["experiment=smoke", f"train.steps={STEPS}", "train.precision=fp32", "train.log_every=1"]
DEADLINE_S = 300.0


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    root = tmp_path_factory.mktemp("reference")
    launch(BASE, nproc=2, root=root, name="run", extra_torchrun=["--max-restarts=0"])
    return [r["loss"] for r in read_metrics(root / "run")]


def start(root: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    cmd += ["-m", "resurgo.launch.train", f"run.root={root}", "run.name=run", "train.device=cpu", *BASE, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESURGO_TEST_RUN": str(root)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root)


def worker_of(root: Path, rank: int) -> int:
    pid = rank_process(f"RESURGO_TEST_RUN={root}", f"RANK={rank}", local_rank=rank)
    assert pid is not None, f"no worker of rank {rank}"
    return pid


def wait_for_step(root: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + DEADLINE_S
    metrics = root / "run" / "metrics.jsonl"
    while not (metrics.exists() and sum(1 for line in metrics.open() if line.strip()) >= step):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, output[-6000:]
    return output


def losses_by_step(root: Path) -> list[float]:
    by_step = {r["step"]: r["loss"] for r in read_metrics(root / "run")}  # a redone step: the newest wins
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.slow  # benchmarks/rank_crash.py's tiny run in the default tests kills a worker the same way
def test_a_killed_worker_is_forked_again_and_the_run_goes_on_from_memory(tmp_path, reference):
    proc = start(tmp_path, [])
    wait_for_step(tmp_path, KILL_AT, proc)
    os.kill(worker_of(tmp_path, 1), signal.SIGKILL)
    output = finish(proc)
    assert "rank 1: warm restart 1, generation 1: this node's worker ended by SIGKILL" in output
    # rank 0's worker was fenced, or had already failed in a collective with the dead one
    assert "rank 0: warm restart 1, generation 1: " in output
    assert "resume: from keeper memory at step" in output
    assert losses_by_step(tmp_path) == reference


HANG_S = 3.0


def test_a_hung_worker_is_ended_by_its_keeper_and_forked_again(tmp_path, reference):
    """SIGSTOPped, sockets open: its keeper ends it after fault.hang_timeout_s (the supervisor stays),
    and the warm restart resumes bit-exactly within that time and a few seconds."""
    proc = start(tmp_path, [f"fault.hang_timeout_s={HANG_S:g}"])
    wait_for_step(tmp_path, KILL_AT, proc)
    stopped = time.time()
    os.kill(worker_of(tmp_path, 0), signal.SIGSTOP)
    output = finish(proc)
    assert "made no progress for" in (tmp_path / "run" / "keeper.log").read_text()
    # the keeper ends both of its node's workers; rank 0's supervisor may see rank 1's first and fence its own
    assert "rank 0: warm restart 1, generation 1: " in output
    assert losses_by_step(tmp_path) == reference
    redone = min(r["time"] for r in read_metrics(tmp_path / "run") if r["time"] > stopped and r["step"] > 1)
    assert HANG_S <= redone - stopped <= HANG_S + 30, (
        redone - stopped
    )  # loose: a loaded machine; the bar is benchmarked
