"""Real SIGKILLs around the keeper.

A worker killed during forward, during its background snapshot copy, or while its keeper persists
is restarted by torchrun (--max-restarts=1), resumes from the keeper's memory having lost at most
`snapshot_every` steps, and its losses continue bit-exactly those of an uninterrupted run. A killed
keeper costs the memory snapshots only: training goes on, a new keeper starts and protection
resumes. A keeper killed in the middle of a persist leaves the previous committed checkpoint loadable.
A rank that finishes before the final step is complete on every rank ends cleanly when its keeper
exits after the commit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from resurgo.checkpoint.keeper.client import keeper_pid
from resurgo.checkpoint.keeper.protocol import run_id, segment_prefix
from resurgo.checkpoint.keeper.shm import list_segments
from resurgo.checkpoint.store import commit as commits
from resurgo.checkpoint.store.reader import Checkpoint, verify

STEPS, EVERY = 8, 4
BASE = [
    "experiment=smoke",
    f"train.steps={STEPS}",
    "train.precision=fp32",
    "parallel.dp_shard=2",
    f"checkpoint.every={EVERY}",
    "train.seq_len=32",
    "model.n_layers=2",
]

# torchrun runs this instead of `-m resurgo.launch.train`: on the first attempt, the chosen rank dies
# (or kills its keeper) at the chosen point, then everything runs as a user would run it.
WRAPPER = textwrap.dedent(
    """
    import glob, os, signal, sys, time
    from pathlib import Path

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    # torch 2.13's agent store keeps the gloo addresses of earlier attempts under the same keys, so a
    # restarted worker connects to its dead predecessor; a prefix per attempt avoids that.
    import torch.distributed as dist
    init_process_group = dist.init_process_group
    def init_with_attempt_prefix(backend=None, **kwargs):
        if "store" not in kwargs and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]), is_master=False)
            kwargs["store"] = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent)
        return init_process_group(backend, **kwargs)
    dist.init_process_group = init_with_attempt_prefix

    point, at, rank = os.environ["FAULT_POINT"], int(os.environ["FAULT_STEP"]), int(os.environ["FAULT_RANK"])
    run_dir = Path(os.environ["FAULT_RUN_DIR"])
    if point == "late_copy":  # polls 2 s apart: the first rank done asks again only after its keeper exited
        from resurgo.checkpoint.recovery import protection as recovery
        recovery.COMMIT_POLL_S = 2.0
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and int(os.environ["RANK"]) == rank:
        from resurgo.checkpoint.snapshot import engine as snapshot
        from resurgo.checkpoint.keeper.client import keeper_pid
        from resurgo.trainer.trainer import Trainer

        if point in ("forward", "keeper", "stop", "flip"):
            forward_backward = Trainer.forward_backward
            def patched(self, *args, **kwargs):
                if self.progress.step + 1 == at:
                    if point == "forward":
                        die()
                    if point == "flip":  # one bit of every snapshot this rank's keeper holds goes bad, then the rank dies
                        time.sleep(1.0)  # the previous step's lazy copy lands first: it would overwrite the flip
                        from resurgo.checkpoint.keeper import shm
                        from resurgo.checkpoint.keeper.protocol import run_id, segment_prefix
                        for name, _ in shm.list_segments(segment_prefix(run_id(run_dir))):
                            if f".r{rank}.s" in name:
                                segment = shm.Segment.attach(name)
                                segment.array()[0] ^= 0x04
                                segment.close()
                        die()
                    if point == "stop":  # hung, sockets open: only a watch notices
                        (run_dir / "stopped_at").write_text(str(time.time()))
                        os.kill(os.getpid(), signal.SIGSTOP)
                    os.kill(keeper_pid(run_dir), signal.SIGKILL)
                if point == "keeper" and self.progress.step + 1 > at:
                    time.sleep(1.5)  # steps as long as a real one: the new keeper starts meanwhile
                return forward_backward(self, *args, **kwargs)
            Trainer.forward_backward = patched
        elif point == "copy":
            copy = snapshot.HostCopier.copy
            calls = []
            def patched(self, dst, src, ready, **kwargs):
                calls.append(1)
                if len(calls) == at:  # one snapshot per step
                    copy(self, dst[: len(dst) // 2], src[: len(src) // 2], ready)
                    die()
                copy(self, dst, src, ready, **kwargs)
            snapshot.HostCopier.copy = patched
        elif point == "late_copy":  # this rank's copy of step `at` lags: the other rank finishes first
            copy = snapshot.HostCopier.copy
            calls = []
            def patched(self, dst, src, ready, **kwargs):
                calls.append(1)
                if len(calls) == at:
                    time.sleep(3)
                copy(self, dst, src, ready, **kwargs)
            snapshot.HostCopier.copy = patched
        elif point == "persist":
            take = snapshot.SnapshotEngine._snapshot
            def patched(self, captured, ready, persist):
                take(self, captured, ready, persist)
                if captured.step == at:
                    deadline = time.monotonic() + 60
                    while not glob.glob(str(run_dir / "checkpoints" / f".step-{at:08d}.tmp-*")) and time.monotonic() < deadline:
                        time.sleep(0.001)
                    die()  # the keeper is writing step `at` now
            snapshot.SnapshotEngine._snapshot = patched
    from resurgo.launch.train import main
    main()
    """
)


def torchrun(tmp_path: Path, *, name: str, fault: tuple[str, int, int] | None = None, overrides: list[str] = ()) -> str:
    """Run the training through torchrun with one restart allowed; returns everything it printed."""
    run_dir = tmp_path / name
    wrapper = tmp_path / "train_with_faults.py"
    wrapper.write_text(WRAPPER)
    point, step, rank = fault or ("none", 0, -1)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RESURGO_WARM_RESTARTS": "0",  # torchrun's own restart: the faults are injected on its first attempt
        "FAULT_POINT": point,
        "FAULT_STEP": str(step),
        "FAULT_RANK": str(rank),
        "FAULT_RUN_DIR": str(run_dir),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=1",
        str(wrapper),
        *BASE,
        *overrides,
        f"run.root={tmp_path}",
        f"run.name={name}",
        "train.device=cpu",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    finally:
        pid = keeper_pid(run_dir)
        if pid is not None and fault is not None:
            deadline = time.monotonic() + 30  # it exits by itself once every rank finished
            while keeper_pid(run_dir) is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if keeper_pid(run_dir) is not None:
                os.kill(pid, signal.SIGTERM)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{output[-8000:]}"
    return output


def losses(run_dir: Path) -> dict[int, float]:
    """The loss of every step; a step run again after a restart keeps its last record."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records}


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    root = tmp_path_factory.mktemp("reference")
    torchrun(root, name="run")
    return losses(root / "run")


def resumed_step(output: str) -> int:
    found = re.findall(r"resume: from keeper memory at step (\d+)", output)
    assert len(found) == 1, f"expected one resume from keeper memory:\n{output[-6000:]}"
    return int(found[0])


def check_resumed(tmp_path: Path, output: str, reference: dict[int, float]) -> int:
    """Resumed from memory, at most snapshot_every=1 step lost, every loss bit-exact; the resumed step."""
    run_dir = tmp_path / "run"
    step = resumed_step(output)
    logged = steps_logged(run_dir)
    assert logged[len(logged) - (STEPS - step) :] == list(range(step + 1, STEPS + 1)), (
        logged
    )  # the restart went on from there
    assert sorted(set(logged)) == list(range(1, STEPS + 1))
    assert len(logged) - STEPS <= 1, f"lost more than snapshot_every=1 steps: {logged}"
    assert losses(run_dir) == reference
    assert commits.latest(run_dir / "checkpoints") == run_dir / "checkpoints" / f"step-{STEPS:08d}"
    assert not list_segments(segment_prefix(run_id(run_dir))), "the keeper left shared memory behind"
    return step


def test_worker_killed_during_the_snapshot_copy_resumes_from_memory(tmp_path, reference):
    output = torchrun(tmp_path, name="run", fault=("copy", 5, 0))
    assert check_resumed(tmp_path, output, reference) == 4  # the torn copy of step 5 is never used


@pytest.mark.slow
def test_worker_killed_during_forward_resumes_from_memory(tmp_path, reference):
    output = torchrun(tmp_path, name="run", fault=("forward", 6, 1))
    assert check_resumed(tmp_path, output, reference) in (4, 5)  # the copy of step 5 may still have been running


def test_a_rank_waiting_for_the_final_commit_outlives_its_keepers_exit(tmp_path, reference):
    """Rank 1's copy of the final step lags: rank 0 finishes first and waits for the commit, which
    rank 1's finish then sees through, and the keeper exits. The commit on disk ends rank 0's wait."""
    output = torchrun(tmp_path, name="run", fault=("late_copy", STEPS, 1))
    assert "keeper stopped before the final checkpoint" not in output
    assert losses(tmp_path / "run") == reference
    assert commits.latest(tmp_path / "run" / "checkpoints") == tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}"


def test_worker_killed_while_its_keeper_persists(tmp_path, reference):
    output = torchrun(tmp_path, name="run", fault=("persist", EVERY, 1))
    assert check_resumed(tmp_path, output, reference) == EVERY
    step = Checkpoint.open(tmp_path / "run" / "checkpoints" / f"step-{EVERY:08d}")
    assert step.meta.step == EVERY and verify(step) == []  # the keeper finished it without its worker


def test_keeper_killed_training_goes_on_and_a_new_keeper_takes_over(tmp_path, reference):
    output = torchrun(tmp_path, name="run", fault=("keeper", 3, 0))
    assert "memory snapshots up to step" in output and "were lost" in output
    assert "memory snapshots resume with keeper" in output
    assert "resume:" in output and "keeper memory" not in output  # no restart was needed
    assert losses(tmp_path / "run") == reference
    assert steps_logged(tmp_path / "run") == list(range(1, STEPS + 1))
    assert commits.latest(tmp_path / "run" / "checkpoints") == tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}"
    assert "reclaimed" in (tmp_path / "run" / "keeper.log").read_text()


def test_a_bit_flipped_in_keeper_memory_is_caught_and_the_disk_serves(tmp_path, reference):
    output = torchrun(tmp_path, name="run", fault=("flip", 7, 1))
    assert "checksum mismatch" in output and "is unusable" in output, output[-6000:]
    assert re.search(r"resume: from disk at step 4", output), output[-6000:]
    assert losses(tmp_path / "run") == reference


HANG_S = 8.0
RESTART_S = 60.0  # torchrun's restart, the new workers' start-up and the restore, on a loaded 2-core machine


def test_a_stopped_rank_is_ended_by_its_keeper_and_resumes_from_memory(tmp_path, reference):
    """A rank SIGSTOPped mid-step (the other waits for it in a collective, both sockets open): its
    keeper ends the node's ranks after fault.hang_timeout_s, before any collective times out, and
    the restart resumes from memory, bit-exactly."""
    output = torchrun(tmp_path, name="run", fault=("stop", 5, 1), overrides=[f"fault.hang_timeout_s={HANG_S:g}"])
    assert "made no progress for" in (tmp_path / "run" / "keeper.log").read_text()
    assert "timed out" not in output.lower()  # no collective waited for its own timeout
    assert check_resumed(tmp_path, output, reference) in (3, 4)
    stopped = float((tmp_path / "run" / "stopped_at").read_text())
    stamp = re.search(r"\[([\d-]+ [\d:]+),(\d+)\]\[[\w.]+\]\[INFO\] - resume: from keeper memory", output)
    resumed = time.mktime(time.strptime(stamp[1], "%Y-%m-%d %H:%M:%S")) + int(stamp[2]) / 1000
    assert HANG_S <= resumed - stopped <= HANG_S + RESTART_S, resumed - stopped


# A keeper that stalls after writing a few chunks of step 2, so that the test can kill it there.
STALLING_KEEPER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from resurgo.checkpoint.store import writer as store
    from resurgo.launch.keeper import main

    marker = Path(sys.argv[1]) / "stalled"
    write_buffers, writes = store.write_buffers, []
    def stalling(path, buffers, **kwargs):
        if ".step-00000002.tmp-" in str(path):
            writes.append(path)
            if len(writes) == 3:
                marker.write_text(str(path))
                time.sleep(600)
        return write_buffers(path, buffers, **kwargs)
    store.write_buffers = stalling
    sys.exit(main(["--run-dir", sys.argv[1]]))
    """
)


def test_keeper_killed_during_a_persist_leaves_the_previous_checkpoint_loadable(tmp_path):
    from resurgo.checkpoint.keeper.client import EXTERNAL, KeeperLink
    from resurgo.checkpoint.keeper.protocol import StoreTarget
    from resurgo.checkpoint.snapshot.capture import StateCapture
    from resurgo.checkpoint.snapshot.engine import Registration, SnapshotEngine
    from resurgo.checkpoint.state.stateful import ModelState, OptimizerState
    from resurgo.checkpoint.store.checkpointer import Checkpointer
    from resurgo.trainer.config import CheckpointConfig

    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    run_dir.mkdir()
    keeper = subprocess.Popen([sys.executable, "-c", STALLING_KEEPER, str(run_dir)], start_new_session=True)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        optim = torch.optim.AdamW(model.parameters())
        states = {"model": ModelState(model), "optim": OptimizerState(model, optim)}
        link = KeeperLink(run_dir=run_dir, mode=EXTERNAL, local_rank=0)
        assert link.connect(wait_s=120)
        store = StoreTarget(str(root), 3, "none", {"dp": 1}, 1, "5eed")
        engine = SnapshotEngine(
            capture=StateCapture(states, rank=0),
            link=link,
            persist_every=1,
            registration=Registration(rank=0, local_world_size=1, world_size=1, token="5eed", store=store),
        )
        for step in (1, 2):
            model(torch.randn(4, 64)).sum().backward()
            engine.before_optimizer_step()
            optim.step()
            engine.after_optimizer_step(step)
            if step == 1:
                expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
                deadline = time.monotonic() + 60
                while commits.latest(root) is None:
                    assert time.monotonic() < deadline, "step 1 was never committed"
                    time.sleep(0.05)
        deadline = time.monotonic() + 60
        while not (run_dir / "stalled").exists():
            assert keeper.poll() is None and time.monotonic() < deadline, "the keeper never reached step 2's chunks"
            time.sleep(0.05)
        os.killpg(keeper.pid, signal.SIGKILL)
        keeper.wait(30)
        engine.fence()
    finally:
        if keeper.poll() is None:
            os.killpg(keeper.pid, signal.SIGKILL)
    assert [p.name for p in root.iterdir() if p.name.startswith(".step-00000002.tmp-")], (
        "the partial save should be left behind"
    )
    assert commits.latest(root) == root / "step-00000001"
    assert verify(Checkpoint.open(root / "step-00000001")) == []
    fresh = torch.nn.Linear(64, 64)
    ck = Checkpointer(
        CheckpointConfig(resume="latest"),
        root=root,
        states={"model": ModelState(fresh), "optim": OptimizerState(fresh, torch.optim.AdamW(fresh.parameters()))},
    )
    assert ck.resume() == 1
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected[name]), name
