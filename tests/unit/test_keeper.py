"""The keeper on its own: private files, slot policy and backpressure, dead workers, stale memory,
budgets, and persisting a snapshot to a committed universal checkpoint."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from resurgo.checkpoint.erasure.coding import ShareRecipe
from resurgo.checkpoint.keeper import persist as persist_module
from resurgo.checkpoint.keeper import shm
from resurgo.checkpoint.keeper.protocol import (
    Client,
    KeeperError,
    Op,
    lock_path,
    run_id,
    segment_name,
    segment_prefix,
    socket_dir,
    socket_path,
)
from resurgo.checkpoint.keeper.server import ORPHAN_GRACE_S, Keeper, KeeperRunning
from resurgo.checkpoint.keeper.slots import COMPLETE, FREE, RankSlots, Slot, choose_slot
from resurgo.checkpoint.state.layout import TensorLayout
from resurgo.checkpoint.state.slot_layout import SlotLayout
from resurgo.checkpoint.store.reader import Checkpoint, ReadRequest, read_fragments

TENSORS = {"model/w": np.arange(24, dtype=np.float32).reshape(4, 6), "optim/step": np.array(3.0, dtype=np.float32)}


def tensors_at(step: int) -> dict[str, np.ndarray]:
    """What the fake rank holds after `step`: every step's bytes differ, so a snapshot or checkpoint
    holding another step's slot shows."""
    return {"model/w": TENSORS["model/w"] + 1000 * step, "optim/step": np.array(step, dtype=np.float32)}


def assert_holds_step(ckpt_dir: Path, step: int, *, rank: int = 0) -> None:
    """The committed checkpoint claims `step` and holds exactly the bytes the rank wrote at that step."""
    ckpt = Checkpoint.open(ckpt_dir)
    assert ckpt.meta.step == step and ckpt.meta.states.of_rank(rank) == {"train": {"step": step}}
    for name, expected in tensors_at(step).items():
        out = np.full_like(expected, -1)
        read_fragments(ckpt, [ReadRequest(TensorLayout(name, expected.shape, str(expected.dtype)).fragment(rank), out)])
        np.testing.assert_array_equal(out, expected, err_msg=f"{name} of {ckpt_dir.name}")


def layout_of(tensors: dict[str, np.ndarray], *, rank: int = 0) -> SlotLayout:
    specs = []
    for name, a in tensors.items():
        fragment = TensorLayout(name, a.shape, str(a.dtype)).fragment(rank)
        specs.append((name, str(a.dtype), a.shape, a.nbytes, fragment.to_json()))
    return SlotLayout.build(specs)


class FakeWorker:
    """A rank that talks to the keeper like SnapshotEngine, writing numpy arrays into its slots."""

    def __init__(
        self,
        keeper: Keeper,
        *,
        rank: int = 0,
        local_world: int = 1,
        root: Path | None = None,
        token: str = "ab12",
        resumed_from: int = 0,
        world: int = 0,
        tensors: Callable[[int], dict[str, np.ndarray]] = tensors_at,
        **register: object,
    ) -> None:
        world = world or local_world
        self.client = Client(socket_path(keeper.rid), timeout=60)
        self.rank, self.layout, self.tensors = rank, layout_of(tensors(0), rank=rank), tensors
        store = None
        if root is not None:
            store = {
                "root": str(root),
                "keep": 2,
                "compression": "none",
                "topology": {"dp": 1},
                "world_size": world,
                "token": token,
            }
        reply = self.client.request(
            "register",
            rank=rank,
            local_world_size=local_world,
            world_size=world,
            token=token,
            store=store,
            layout=self.layout.to_json(),
            host_memory_bytes=0,
            resumed_from=resumed_from,
            **register,
        )
        self.segments = [shm.Segment.attach(n) for n in reply["segments"]]

    def snapshot(self, step: int, *, persist: bool = False, required: bool = False) -> dict:
        reply = self.client.request("acquire", rank=self.rank, step=step, required=required)
        if reply["slot"] is None:
            return reply
        data, tensors = self.segments[reply["slot"]].array(), self.tensors(step)
        for entry in self.layout.entries:
            data[entry.offset : entry.offset + entry.nbytes] = np.frombuffer(tensors[entry.name].tobytes(), np.uint8)
        return self.client.request(
            "complete", rank=self.rank, slot=reply["slot"], step=step, tree={"train": {"step": step}}, persist=persist
        )


@pytest.fixture
def serve(tmp_path):
    started = []

    def start(**kwargs) -> Keeper:
        keeper = Keeper(run_dir=tmp_path / f"run{len(started)}", idle_timeout_s=120, **kwargs)
        keeper.start()
        thread = threading.Thread(target=keeper.serve_forever, daemon=True)
        thread.start()
        started.append((keeper, thread))
        return keeper

    yield start
    for keeper, thread in started:
        keeper.request_stop()
        thread.join(30)


def wait_status(keeper: Keeper, key: str, value: int, *, timeout: float = 30.0) -> dict:
    client = Client(socket_path(keeper.rid))
    deadline = time.monotonic() + timeout
    while (status := client.request("status"))[key] < value:
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
    client.close()
    return status


def test_only_this_user_can_reach_the_socket_and_memory(serve):
    keeper = serve()
    worker = FakeWorker(keeper)
    assert stat.S_IMODE(socket_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path(keeper.rid).stat().st_mode) == 0o600
    for segment in worker.segments:
        assert stat.S_IMODE((shm.SHM_DIR / segment.name).stat().st_mode) == 0o600
        assert segment.name.startswith(segment_prefix(keeper.rid))


def _slots(*states: tuple[str, int, int]) -> RankSlots:
    held = RankSlots(0, SlotLayout((), 0), "t")
    held.slots = [Slot(i, None, step=step, status=status, pins=pins) for i, (status, step, pins) in enumerate(states)]
    return held


def test_slot_policy_keeps_the_newest_and_the_common_step_and_pinned_slots():
    assert choose_slot(_slots((COMPLETE, 5, 0), (FREE, -1, 0), (COMPLETE, 4, 0)), keep=[4]).index == 1
    assert choose_slot(_slots((COMPLETE, 3, 0), (COMPLETE, 5, 0), (COMPLETE, 4, 0)), keep=[4]).index == 0
    assert (
        choose_slot(_slots((COMPLETE, 3, 1), (COMPLETE, 5, 0), (COMPLETE, 4, 0)), keep=[4]) is None
    )  # 3 is persisting
    assert choose_slot(_slots((COMPLETE, 3, 0), (COMPLETE, 5, 0), (COMPLETE, 4, 0)), keep=[3]).index == 2
    # 4 is pinned (being coded) and 3 protected: only the newest, 5, may go, and only if the caller says so
    assert choose_slot(_slots((COMPLETE, 3, 0), (COMPLETE, 5, 0), (COMPLETE, 4, 1)), keep=[4, 3]) is None
    assert (
        choose_slot(_slots((COMPLETE, 3, 0), (COMPLETE, 5, 0), (COMPLETE, 4, 1)), keep=[4, 3], keep_newest=False).index
        == 1
    )


def test_persisted_snapshot_is_committed_and_reads_back(serve, tmp_path):
    keeper = serve()
    worker = FakeWorker(keeper, root=tmp_path / "ckpt")
    worker.snapshot(1)
    worker.snapshot(2, persist=True)
    status = wait_status(keeper, "committed", 2)
    assert status["copied"] == 2 and status["durable"] == 2 and status["backlog"] == 0
    assert_holds_step(tmp_path / "ckpt" / "step-00000002", 2)  # not step 1's slot
    assert dict(Checkpoint.open(tmp_path / "ckpt" / "step-00000002").meta.topology) == {"dp": 1, "world_size": 1}
    assert not list((tmp_path / "ckpt").glob(".step-*"))  # nothing half-written left behind


def test_persisting_an_older_held_step_writes_that_steps_slot(serve, tmp_path):
    """Slots are reused round the ring: after steps 1-5 in 3 slots, steps 3, 4 and 5 sit in slots
    2, 0 and 1. A persist of 4 or 3 must write their own slots, not the newest or the slot's index."""
    keeper = serve(slots=3)
    worker = FakeWorker(keeper, root=tmp_path / "ckpt")
    for step in range(1, 6):
        worker.snapshot(step)
    assert worker.client.request("holdings", rank=0)["steps"] == [3, 4, 5]
    worker.client.request("persist", rank=0, step=4)
    wait_status(keeper, "committed", 4)
    worker.client.request("persist", rank=0, step=3)
    assert worker.client.request("finish", rank=0)["backlog"] == 0
    assert_holds_step(tmp_path / "ckpt" / "step-00000004", 4)
    assert_holds_step(tmp_path / "ckpt" / "step-00000003", 3)


def test_a_dead_worker_frees_its_unfinished_slot_and_keeps_complete_ones(serve):
    keeper = serve(slots=2)
    worker = FakeWorker(keeper)
    worker.snapshot(1)
    assert worker.client.request("acquire", rank=0, step=2)["slot"] is not None
    worker.client.close()  # killed mid-copy
    restarted = FakeWorker(keeper)
    assert restarted.client.request("holdings", rank=0)["steps"] == [1]
    assert restarted.snapshot(2)["copied"] == 2  # the half-written slot was given back


def test_a_slow_persist_skips_snapshots_and_makes_a_required_one_wait(serve, tmp_path, monkeypatch):
    gate = threading.Event()
    original = persist_module.write_fragments
    monkeypatch.setattr(persist_module, "write_fragments", lambda *a, **k: gate.wait(30) and original(*a, **k))
    keeper = serve(slots=2)
    worker = FakeWorker(keeper, root=tmp_path / "ckpt")
    worker.snapshot(1, persist=True)  # pinned while its persist is stuck
    worker.snapshot(2)
    skipped = worker.snapshot(3)
    assert skipped["slot"] is None and skipped["reason"] == "busy" and skipped["skipped"] == 1
    threading.Timer(0.5, gate.set).start()
    start = time.monotonic()
    assert worker.snapshot(4, required=True, persist=True)["copied"] == 4
    assert time.monotonic() - start >= 0.4  # backpressure: waited for the persist, then got the slot
    assert wait_status(keeper, "committed", 4)["committed"] == 4
    assert_holds_step(tmp_path / "ckpt" / "step-00000001", 1)  # its slot was not reused while it persisted
    assert_holds_step(tmp_path / "ckpt" / "step-00000004", 4)


def test_a_persist_waiting_for_a_dead_incarnation_is_abandoned(serve, tmp_path):
    """Rank 1 of a two-node run died before writing its part of step 2: once the run restarts (a new
    token), the committing keeper stops waiting for it and persists the new incarnation's steps."""
    keeper = serve()
    first = FakeWorker(keeper, root=tmp_path / "ckpt", world=2)
    first.snapshot(2, persist=True)
    time.sleep(0.5)  # the committer now waits for rank 1's fragments
    first.client.close()
    again = FakeWorker(keeper, root=tmp_path / "ckpt", token="cd34", resumed_from=0)
    again.snapshot(3, persist=True)
    assert wait_status(keeper, "committed", 3, timeout=20)["backlog"] == 0
    assert not (tmp_path / "ckpt" / "step-00000002").exists()
    assert_holds_step(tmp_path / "ckpt" / "step-00000003", 3)


def test_a_new_incarnation_drops_what_it_did_not_resume_from(serve):
    keeper = serve()
    first = FakeWorker(keeper)
    for step in (1, 2, 3):
        first.snapshot(step)
    first.client.close()
    again = FakeWorker(keeper, resumed_from=2)  # the same incarnation registering again keeps everything
    assert again.client.request("holdings", rank=0)["steps"] == [1, 2, 3]
    restarted = FakeWorker(keeper, token="cd34", resumed_from=2)
    assert restarted.client.request("holdings", rank=0)["steps"] == [1, 2]


def halved_at(step: int) -> dict[str, np.ndarray]:
    """The fake rank's state under another topology: half the rows, so another slot layout."""
    return {**tensors_at(step), "model/w": tensors_at(step)["model/w"][:2]}


def read_held(client: Client, rank: int, step: int) -> tuple[SlotLayout, dict[str, np.ndarray]]:
    """Rank `rank`'s snapshot of `step` as a recovery reads it from the keeper: layout and tensors."""
    reply = client.request("read", rank=rank, step=step)
    layout, segment = SlotLayout.from_json(reply["layout"]), shm.Segment.attach(reply["segment"])
    data = segment.array()
    found = {e.name: data[e.offset : e.offset + e.nbytes].copy() for e in layout.entries}
    del data
    segment.close()
    client.request("unpin", rank=rank, step=step)
    return layout, found


@pytest.mark.parametrize("protected", [True, False])
def test_a_new_layout_keeps_the_last_incarnations_protected_step_until_it_protects_one(serve, protected):
    """The job re-formed with another layout (it grew back): a node lost before the new incarnation
    protects a step is rebuilt from the step the last one protected, so that step's slot stays,
    served and reported as superseded, until the new incarnation's parity completes."""
    keeper = serve()
    first = FakeWorker(keeper)
    for step in (1, 2, 3):
        first.snapshot(step)
    if protected:
        keeper.parity.protected["ab12"] = 2
    regrown = FakeWorker(keeper, token="cd34", resumed_from=3, tensors=halved_at)
    assert regrown.client.request("holdings", rank=0)["steps"] == []
    report = regrown.client.request("inventory", compact=False)
    assert report["ranks"]["0"]["digest"] == regrown.layout.digest
    if not protected:
        assert report["superseded"] == {}
        return
    assert report["superseded"]["0"]["steps"] == [2] and report["superseded"]["0"]["digest"] == first.layout.digest
    assert report["superseded"]["0"]["trees"] == {"2": {"train": {"step": 2}}}
    layout, found = read_held(regrown.client, 0, 2)
    assert layout.digest == first.layout.digest
    for name, expected in tensors_at(2).items():
        assert found[name].tobytes() == expected.tobytes(), name
    regrown.snapshot(4)
    keeper.parity.protected["cd34"] = 4
    keeper._protected()  # the parity service's call once a step is protected
    assert regrown.client.request("inventory", compact=True)["superseded"] == {}
    with pytest.raises(KeeperError, match="no complete snapshot of step 2"):
        regrown.client.request("read", rank=0, step=2)


def test_a_new_incarnation_with_the_same_layout_keeps_the_last_ones_protected_step(serve):
    """The same holds when the layout carried over (a restart on the same topology): its new
    snapshots take the other slots until it protects a step of its own."""
    keeper = serve()
    first = FakeWorker(keeper)
    for step in (1, 2, 3):
        first.snapshot(step)
    keeper.parity.protected["ab12"] = 1
    again = FakeWorker(keeper, token="cd34", resumed_from=3)
    for step in (4, 5, 6):
        again.snapshot(step)
    assert again.client.request("holdings", rank=0)["steps"] == [1, 5, 6]
    keeper.parity.protected["cd34"] = 5
    again.snapshot(7)
    assert again.client.request("holdings", rank=0)["steps"] == [5, 6, 7]


def test_a_step_already_held_is_not_copied_again(serve):
    keeper = serve()
    worker = FakeWorker(keeper)
    worker.snapshot(1)
    assert worker.client.request("acquire", rank=0, step=1)["reason"] == "held"


def test_a_budget_below_two_snapshots_is_refused_with_advice(serve):
    keeper = serve(host_memory_bytes=layout_of(TENSORS).nbytes)
    with pytest.raises(KeeperError, match="at least 2 are needed: raise it"):
        FakeWorker(keeper)


def test_one_keeper_per_run_and_node(serve, tmp_path):
    keeper = serve()
    with pytest.raises(KeeperRunning):
        Keeper(run_dir=tmp_path / "run0").start()
    assert keeper.rid == run_id(tmp_path / "run0")


def test_memory_of_dead_keepers_is_reclaimed_at_start(serve, tmp_path):
    dead = run_id(tmp_path / "crashed")
    lock_path(dead).write_text("999999\n")  # a lock nobody holds: its keeper is gone
    orphan = shm.Segment.create(segment_name(dead, keeper_id="0dead0", rank=0, slot=0, serial=1), 4096)
    (socket_dir() / f"{dead}.sock").write_text("")
    mine = run_id(tmp_path / "run0")
    leftover = shm.Segment.create(segment_name(mine, keeper_id="0dead1", rank=0, slot=1, serial=2), 4096)
    serve()
    assert not (shm.SHM_DIR / orphan.name).exists() and not (shm.SHM_DIR / leftover.name).exists()
    assert not (socket_dir() / f"{dead}.sock").exists() and not lock_path(dead).exists()


def test_finish_waits_for_the_last_persist_then_the_keeper_exits(serve, tmp_path):
    keeper = serve()
    worker = FakeWorker(keeper, root=tmp_path / "ckpt")
    worker.snapshot(3)
    worker.client.request("persist", rank=0, step=3)
    assert worker.client.request("finish", rank=0)["committed"] == 3
    deadline = time.monotonic() + 10
    while socket_path(keeper.rid).exists():
        assert time.monotonic() < deadline, "the keeper did not exit after its last rank finished"
        time.sleep(0.05)
    assert not shm.list_segments(segment_prefix(keeper.rid))
    assert_holds_step(tmp_path / "ckpt" / "step-00000003", 3)


def test_warming_maps_and_pins_what_a_restore_will_read(serve):
    from resurgo.checkpoint.keeper.client import HeldSlots

    class Counting(Client):
        def request(self, op, **fields):
            self.ops.append(op)
            return super().request(op, **fields)

    keeper = serve()
    worker = FakeWorker(keeper)
    worker.snapshot(1)
    worker.snapshot(2)
    keeper.reads[4] = {"step": 1, "ranks": [0]}  # as staging plans it: new rank 4 reads old rank 0's step 1
    link = Counting(socket_path(keeper.rid))
    link.ops = []
    held = HeldSlots(link, owned=True)
    held.warm(4)
    assert [s.step for s in keeper.ranks[0].slots if s.pins] == [1]  # pinned for the restore: not reused meanwhile
    entry = worker.layout.entries[0]
    data = held(0, 1)[entry.offset : entry.offset + entry.nbytes].view(np.float32)
    np.testing.assert_array_equal(data, tensors_at(1)[entry.name].ravel())  # step 1's slot, not step 2's
    assert link.ops == ["inventory", "read"]  # the restore's lookup found it mapped
    held.close()
    assert not any(s.pins for s in keeper.ranks[0].slots)  # closing released it


class DeviceSitePlan:
    """A protector whose plan has the workers scale one parity row's shares (fault.erasure.encode=device)."""

    current = None  # nothing is coded: only the share space is under test

    def share_recipe(self, rank: int, sizes: dict[int, int]) -> ShareRecipe:
        return ShareRecipe("ab12", sizes[rank], ((0, sizes[rank], (2,)),))

    def protected_step(self) -> int:
        return -1

    coded_step = coding_step = protected_step

    def protected_of(self, token: str) -> int:
        return -1

    def parity_bytes(self) -> int:
        return 0

    def cpu_s(self) -> float:
        return 0.0

    def newest_plan(self) -> None:
        return None  # nothing to rebuild from when the worker goes

    def stop(self) -> None:
        pass


@pytest.mark.parametrize("snapshots_in_budget, scaled_by_workers", [(6, True), (3, False)])
def test_scaled_shares_live_within_the_memory_budget(serve, caplog, snapshots_in_budget, scaled_by_workers):
    """The shares a worker scales sit beside its slots: they get memory only when every slot's fit the
    budget too; otherwise the snapshots keep their slots and the holders scale."""
    nbytes = layout_of(TENSORS).nbytes
    keeper = serve(host_memory_bytes=snapshots_in_budget * nbytes)
    keeper.parity = DeviceSitePlan()
    worker = FakeWorker(keeper)
    replies = [worker.client.request("acquire", rank=0, step=step) for step in (1, 2)]
    assert all(r["slot"] is not None for r in replies) and len(worker.segments) == 3
    assert [r["shares"] is not None for r in replies] == [scaled_by_workers] * 2
    assert keeper.ranks[0].nbytes <= snapshots_in_budget * nbytes
    assert ("do not fit checkpoint.host_memory_gb" in caplog.text) is not scaled_by_workers


def test_a_changed_layout_gets_segments_under_new_names(serve):
    """A worker keeps what it mapped by name: new slots of a rank whose layout changed must not
    reuse the old names, or the worker would write into memory the keeper already dropped."""
    keeper = serve()
    worker = FakeWorker(keeper)
    before = [s.name for s in worker.segments]
    wider = {**TENSORS, "model/b": np.ones(8, dtype=np.float32)}
    reply = worker.client.request(
        "register",
        rank=0,
        local_world_size=1,
        world_size=1,
        token="ab12",
        store=None,
        layout=layout_of(wider).to_json(),
        host_memory_bytes=0,
        resumed_from=0,
    )
    assert len(reply["segments"]) == len(before) and not set(reply["segments"]) & set(before)


def test_a_persist_that_fails_once_is_retried_and_committed(serve, tmp_path, monkeypatch):
    original, calls = persist_module.write_fragments, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(persist_module, "write_fragments", flaky)
    keeper = serve()
    worker = FakeWorker(keeper, root=tmp_path / "ckpt")
    worker.snapshot(2, persist=True)
    status = wait_status(keeper, "committed", 2)
    assert status["failed"] == -1 and len(calls) == 2
    assert_holds_step(tmp_path / "ckpt" / "step-00000002", 2)
    assert not list((tmp_path / "ckpt").glob(".step-*"))  # the failed attempt's folder is gone
    left = {p.name for p in (tmp_path / "ckpt" / ".keeper-ab12").iterdir()}
    assert left == {"plan.json", "fragments-0.json"}  # the run's save plan; no attempt's files


def test_a_keeper_failing_its_part_fails_the_step_on_every_node_at_once(serve, tmp_path, monkeypatch):
    """Two nodes' keepers persist one step: the second cannot write. The committer stops waiting for
    it at its note (not at the 600 s deadline), every attempt's folder goes, and both report why."""
    original = persist_module.write_fragments

    def failing_rank_1(*args, **kwargs):
        if kwargs["rank"] == 1:
            raise OSError(5, "Input/output error")
        return original(*args, **kwargs)

    monkeypatch.setattr(persist_module, "write_fragments", failing_rank_1)
    committer, other = serve(), serve()
    workers = [FakeWorker(k, rank=r, root=tmp_path / "ckpt", world=2) for r, k in enumerate((committer, other))]
    for worker in workers:
        worker.snapshot(2, persist=True)
    for keeper in (committer, other):
        status = wait_status(keeper, "failed", 2, timeout=20)  # three attempts, 1 + 2 s apart
        assert "Input/output error" in status["failure"] and str(tmp_path / "ckpt") in status["failure"]
    assert not list((tmp_path / "ckpt").glob(".step-*")) and not list((tmp_path / "ckpt").glob("step-*"))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def wait_stopped(keeper: Keeper, *, timeout: float) -> float:
    start = time.monotonic()
    while socket_path(keeper.rid).exists():
        assert time.monotonic() - start < timeout, "the keeper did not exit"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_keeper_whose_workers_and_launcher_are_gone_frees_its_memory_and_exits(serve):
    keeper = serve()
    worker = FakeWorker(keeper, launcher=_dead_pid())
    worker.snapshot(1)
    worker.client.close()
    wait_stopped(keeper, timeout=ORPHAN_GRACE_S + 10)
    assert not shm.list_segments(segment_prefix(keeper.rid))


def test_a_keeper_holding_nothing_worth_keeping_frees_its_memory(serve):
    """Its launcher lives (this process): an external keeper stays, without memory; one a worker started exits."""
    for auto in (False, True):
        keeper = serve(auto=auto)
        worker = FakeWorker(keeper, launcher=os.getpid())
        assert (
            worker.client.request("acquire", rank=0, step=1)["slot"] is not None
        )  # killed before its first snapshot completed
        worker.client.close()
        if auto:
            wait_stopped(keeper, timeout=ORPHAN_GRACE_S + 10)
        else:
            deadline = time.monotonic() + 10
            while shm.list_segments(segment_prefix(keeper.rid)):
                assert time.monotonic() < deadline, "the empty slots were not freed"
                time.sleep(0.05)
            assert socket_path(keeper.rid).exists()


def test_a_killed_keepers_memory_is_reclaimed_by_any_keeper_of_any_run(serve, tmp_path):
    """Its lock lives in another keeper folder (a node simulated on this machine): the pid in the
    segment's name says its keeper is dead."""
    dead = run_id(tmp_path / "elsewhere")
    orphan = shm.Segment.create(segment_name(dead, keeper_id="0dead2", rank=0, slot=0, serial=1, pid=_dead_pid()), 4096)
    mine = shm.Segment.create(
        segment_name(dead, keeper_id="0live0", rank=0, slot=1, serial=2), 4096
    )  # this process: alive
    serve()
    assert not (shm.SHM_DIR / orphan.name).exists() and (shm.SHM_DIR / mine.name).exists()
    shm.unlink(mine.name)


def test_keepers_of_a_node_are_listed_and_stopped_from_the_command_line(tmp_path):
    run_dir = tmp_path / "cli"
    keeper = subprocess.Popen(
        [sys.executable, "-m", "resurgo.launch.keeper", "--run-dir", str(run_dir)], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not socket_path(run_id(run_dir)).exists():
            assert time.monotonic() < deadline and keeper.poll() is None, "the keeper did not start"
            time.sleep(0.05)
        cli = [sys.executable, "-m", "resurgo.launch.keeper"]
        listed = subprocess.run([*cli, "list"], capture_output=True, text=True, check=True).stdout
        assert any(
            run_id(run_dir) in line and str(keeper.pid) in line and "running" in line for line in listed.splitlines()
        )
        stopped = subprocess.run([*cli, "stop", str(run_dir)], capture_output=True, text=True, check=True, timeout=60)
        assert "stopped 1 keeper" in stopped.stdout
        assert keeper.wait(timeout=10) == 0
    finally:
        if keeper.poll() is None:
            keeper.kill()


def test_a_keeper_whose_lease_ends_frees_its_memory_and_exits(serve):
    """Its launcher lives (this process) but no worker came back within the lease (fault.keeper_lease_s)."""
    keeper = serve()
    worker = FakeWorker(keeper, launcher=os.getpid(), lease_s=1.0)
    worker.snapshot(1)
    assert keeper.idle_timeout_s == 1.0
    worker.client.close()
    assert wait_stopped(keeper, timeout=15) >= 1.0
    assert not shm.list_segments(segment_prefix(keeper.rid))


def test_unknown_operations_and_malformed_frames_get_an_error_reply_and_the_keeper_serves_on(serve):
    keeper = serve()
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(str(socket_path(keeper.rid)))
    stream = sock.makefile("rwb")
    for line in (b'{"op": "launch_missiles"}\n', b"not json\n", b"[1, 2]\n", b'{"op": "read"}\n', b'{"op": 7}\n'):
        stream.write(line)
        stream.flush()
        reply = json.loads(stream.readline())
        assert reply["ok"] is False and reply["error"], (line, reply)
    stream.write(b'{"op": "status"}\n')
    stream.flush()
    assert json.loads(stream.readline())["ok"] is True
    sock.close()
    assert {op.value for op in Op} >= {"hello", "status", "read", "persist", "prefetch"}


def test_a_fenced_workers_late_close_leaves_what_its_successor_began(serve):
    """A warm restart forks the successor once its predecessor runs no more code, so the successor may
    register and begin a copy before the keeper sees the predecessor's connection close."""
    keeper = serve(slots=3)
    fenced = FakeWorker(keeper)
    fenced.snapshot(1)
    assert fenced.client.request("acquire", rank=0, step=2)["slot"] is not None  # killed mid-copy
    successor = FakeWorker(keeper, token="cd34", resumed_from=1)
    begun = successor.client.request("acquire", rank=0, step=2)["slot"]
    assert begun is not None
    fenced.client.close()
    deadline = time.monotonic() + 10
    while keeper._conns > 1:
        assert time.monotonic() < deadline, "the keeper never saw the fenced worker's connection close"
        time.sleep(0.01)
    successor.client.request("complete", rank=0, slot=begun, step=2, tree={"train": {"step": 2}}, persist=False)
    assert successor.client.request("holdings", rank=0)["steps"] == [1, 2]
