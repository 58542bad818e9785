"""Whole nodes killed with SIGKILL (agent, workers and keeper): the job comes back from the survivors' memory.

Simulated nodes on localhost (`LocalCluster`), each with its own keeper and node identity, elastic
torchrun (`--nnodes MIN:MAX`). A recovered run's losses are held against one process training the same
steps: every topology follows it within 1e-4 (tests/integration), so matching it means matching an
uninterrupted run on the surviving nodes from the restored state.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import launch, read_metrics
from resurgo.launch import etcd
from resurgo.launch.local_nodes import RDZV_CONF, LocalCluster, logged_steps

STEPS = 24
BASE = ["experiment=smoke", f"train.steps={STEPS}", "train.precision=fp32", "train.batch_size=12", "train.device=cpu"]
RTOL = 1e-4
RESUMED = re.compile(r"resume: (?:from )?(peer keepers' memory|disk|keeper memory|fresh start)\D*(\d+)")


def reference_run(root: Path, steps: int = STEPS) -> dict[int, float]:
    launch([o for o in BASE if o != "train.device=cpu"] + [f"train.steps={steps}"], nproc=1, root=root)
    return {r["step"]: r["loss"] for r in read_metrics(root / "run")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    return reference_run(tmp_path_factory.mktemp("reference"))


def wait_until(cluster: LocalCluster, condition, *, node: int = 0, timeout: float = 180, every: float = 0.1) -> None:
    """Poll `condition` until it holds; past `timeout`, fail with node `node`'s output."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, cluster.output(node)[-4000:]
        time.sleep(every)


def wait_for_step(cluster: LocalCluster, step: int, *, timeout: float = 180) -> None:
    wait_until(cluster, lambda: logged_steps(cluster.run_dir) >= step, timeout=timeout)


def latest_losses(run_dir: Path) -> dict[int, float]:
    """The loss of every step, as last logged (steps replayed after a recovery overwrite earlier ones)."""
    return {
        r["step"]: r["loss"]
        for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    }


def resumes(cluster: LocalCluster, node: int = 0) -> list[tuple[str, int]]:
    return [(m[1], int(m[2])) for m in RESUMED.finditer(cluster.output(node))]


def assert_matches(losses: dict[int, float], reference: dict[int, float], *, steps: int = STEPS) -> None:
    assert sorted(losses) == list(range(1, steps + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=RTOL), step


def cluster_of(tmp_path, *, nodes: int, per_node: int, min_nodes: int, extra=(), **options) -> LocalCluster:
    return LocalCluster(
        nodes=nodes,
        nproc_per_node=per_node,
        min_nodes=min_nodes,
        overrides=BASE + list(extra),
        run_root=tmp_path,
        name="run",
        **options,
    )


def kill_at(cluster: LocalCluster, step: int, *nodes: int) -> None:
    """Kill `nodes` once training reached `step` and some step is protected: on a loaded machine the
    keepers' coding (idle priority) can lag that far behind the first steps."""
    wait_for_step(cluster, step)
    wait_until(cluster, lambda: any(r["protected_step"] >= 0 for r in read_metrics(cluster.run_dir)))
    for index in nodes:
        cluster.kill_node(index)


def test_a_lost_node_comes_back_from_memory_on_fewer_nodes(tmp_path, reference):
    """3 nodes x 2 ranks, k=2, m=1, no disk checkpoint: lose one node, go on with 2 from memory."""
    with cluster_of(tmp_path, nodes=3, per_node=2, min_nodes=2) as cluster:
        kill_at(cluster, 8, 2)
        assert cluster.wait(timeout=300)[:2] == [0, 0], cluster.output(0)[-4000:]
        log = cluster.output(0)
    ((source, step),) = [r for r in resumes(cluster) if r[0] != "fresh start"]
    assert source == "peer keepers' memory" and step >= 8 - 2, log[-3000:]  # one step in flight, one being coded
    # node1's keeper decoded node2's ranks while the job restarted; the workers read them as held copies
    assert "lost node2" in log and "world 6 -> 4" in log
    assert "rebuilt from peers' memory while the job restarted: rank 4 by node1's keeper" in log, log[-3000:]
    # Each survivor prefetched what its new ranks read from the other one while the model was built.
    assert "prefetched from peers while the workers started: " in log and " 0.0 MB read from peers" in log, log[-3000:]
    assert not list(tmp_path.glob("run/checkpoints/step-*")), "no disk checkpoint was asked for"
    assert_matches(latest_losses(cluster.run_dir), reference)
    # The 2 nodes protect their own steps at once, not after the leader gave up on the dead node's parity.
    assert read_metrics(cluster.run_dir)[-1]["protected_step"] >= STEPS - 4


@pytest.mark.slow  # the decoding of two lost nodes: test_peer_recovery's; one node lost end to end: above
def test_two_nodes_lost_at_once_with_two_parities(tmp_path, reference):
    """The workers scale parity 1's shares themselves (encode=device, on the CPU here): the holders
    only add them, and the lost nodes come back from that parity."""
    extra = ["fault.erasure.parity=2", "fault.erasure.encode=device"]
    with cluster_of(tmp_path, nodes=4, per_node=1, min_nodes=2, extra=extra) as cluster:
        kill_at(cluster, 8, 2, 3)
        assert cluster.wait(timeout=300)[:2] == [0, 0], cluster.output(0)[-4000:]
    sources = [r[0] for r in resumes(cluster) if r[0] != "fresh start"]
    assert sources == ["peer keepers' memory"], cluster.output(0)[-3000:]
    log = cluster.output(0)
    assert "(k=2, m=2" in log and "scaled by each worker on its device" in log
    assert "the workers scale the shares of parity rows 1..1: the holders only add them" in log, log[-3000:]
    assert_matches(latest_losses(cluster.run_dir), reference)


def test_more_lost_than_parity_falls_back_to_disk(tmp_path, reference):
    with cluster_of(tmp_path, nodes=3, per_node=1, min_nodes=1, extra=["checkpoint.every=5"]) as cluster:
        kill_at(cluster, 12, 1, 2)
        assert cluster.wait(timeout=300)[0] == 0, cluster.output(0)[-4000:]
        log = cluster.output(0)
    assert "peer memory cannot rebuild a step" in log and "each group survives 1 lost" in log, log[-3000:]
    source, step = [r for r in resumes(cluster) if r[0] != "fresh start"][0]
    assert source == "disk" and step >= 5 and step % 5 == 0
    assert_matches(latest_losses(cluster.run_dir), reference)


def test_more_lost_than_parity_without_a_disk_checkpoint_stops(tmp_path):
    with cluster_of(tmp_path, nodes=3, per_node=1, min_nodes=1, extra=["train.steps=100000"]) as cluster:
        kill_at(cluster, 6, 1, 2)
        codes = cluster.wait(timeout=300)
        log = cluster.output(0)
    assert codes[0] != 0
    assert "refusing to start fresh" in log, log[-3000:]
    assert log.count("a restart cannot change this failure") == 1, log[-3000:]  # the first verdict ends the job


GROW_STEPS = 300  # long enough for the replacement node to join, and a loss after it, before the run ends


@pytest.mark.skipif(shutil.which("etcd") is None, reason=f"the etcd server is not installed: {etcd.INSTALL_HINT}")
def test_a_replacement_node_grows_the_job_back_and_a_loss_before_it_protects_a_step_goes_back(tmp_path):
    """Lose one of 3 nodes, recover onto 2 from memory, then a new node joins; one of the 2 is lost as
    soon as the grown job took its first snapshot, long before it protected one (its parity traffic is
    capped): the last incarnation's protected step, kept by the survivor's keeper in its old layout,
    and that incarnation's parity rebuild it. Every step's loss, on 3, 2, 3 and 2 nodes, follows one
    process training the same steps (the learning-rate schedule depends on train.steps, so the
    reference runs GROW_STEPS too). Under etcd, with torch's heartbeats set to expire after 2 s: a
    node that had just joined a round used to drop itself from it, and the replacement, finding no
    participant left, started a round of its own and was never admitted."""
    reference = reference_run(tmp_path / "reference", GROW_STEPS)
    quick = {**RDZV_CONF, "keep_alive_max_attempt": 2, "last_call_timeout": 1}
    extra = [f"train.steps={GROW_STEPS}", "fault.erasure.max_mb_s=0.4"]
    with cluster_of(tmp_path, nodes=3, per_node=1, min_nodes=2, extra=extra, rdzv="etcd", rdzv_conf=quick) as cluster:
        kill_at(cluster, 6, 2)
        wait_until(cluster, lambda: len(resumes(cluster)) == 2)  # the fresh start, then the recovery onto 2 nodes
        shrunk = resumes(cluster)[1][1]
        wait_until(cluster, lambda: any(r["protected_step"] > shrunk for r in read_metrics(cluster.run_dir)))
        cluster.add_node()
        wait_until(cluster, lambda: len(resumes(cluster)) == 3)  # grown back to 3
        grown = resumes(cluster)[2][1]
        wait_until(cluster, lambda: logged_steps(cluster.run_dir) > grown + 1)  # its first snapshots are in
        cluster.kill_node(0)
        assert cluster.wait(timeout=300) == [-9, 0, -9, 0], cluster.output(1)[-4000:]
        before, log = cluster.output(0), cluster.output(1)
    assert "world 2 -> 3" in before
    assert [r[0] for r in resumes(cluster)][1:] == ["peer keepers' memory"] * 2, before[-3000:]
    assert "its snapshot of step" in log and "is kept until this one protects a step" in log, log[-3000:]
    source, step = resumes(cluster, 1)[-1]
    assert source == "peer keepers' memory" and shrunk < step <= grown, (resumes(cluster, 1), shrunk, grown)
    assert_matches(latest_losses(cluster.run_dir), reference, steps=GROW_STEPS)


def test_a_second_failure_during_recovery_starts_it_over(tmp_path, reference):
    """4 nodes, m=2: one node dies, and a second one as soon as the survivors begin to recover."""
    with cluster_of(tmp_path, nodes=4, per_node=1, min_nodes=2, extra=["fault.erasure.parity=2"]) as cluster:
        kill_at(cluster, 8, 3)
        # the restarted workers are recovering
        wait_until(cluster, lambda: "erasure plan, 3 nodes" in cluster.output(0), every=0.05)
        cluster.kill_node(2)
        assert cluster.wait(timeout=300)[:2] == [0, 0], cluster.output(0)[-4000:]
    recovered = [r[0] for r in resumes(cluster) if r[0] != "fresh start"]
    assert recovered and set(recovered) == {"peer keepers' memory"}, cluster.output(0)[-3000:]
    assert_matches(latest_losses(cluster.run_dir), reference)


@pytest.mark.slow  # the choice of step: test_peer_recovery's; a loss mid-recovery end to end: above
def test_a_node_lost_during_the_parity_exchange_resumes_from_the_newest_protected_step(tmp_path, reference):
    """The parity traffic capped so that coding a step takes seconds: the node dies while the keepers
    exchange a newer step's parity, and the job resumes from the newest step already protected."""
    with cluster_of(tmp_path, nodes=3, per_node=1, min_nodes=2, extra=["fault.erasure.max_mb_s=0.4"]) as cluster:
        wait_for_step(cluster, 1)
        deadline = time.monotonic() + 180
        while not (
            protected := [r["protected_step"] for r in read_metrics(cluster.run_dir) if r["protected_step"] >= 0]
        ):
            assert time.monotonic() < deadline, cluster.output(0)[-4000:]
            time.sleep(0.05)
        newest = logged_steps(cluster.run_dir)  # the snapshots of the steps before it are complete
        cluster.kill_node(2)
        assert newest < STEPS, "training outran the first protected step: lower the cap"
        # Host snapshots went on every step while the coding fell behind them.
        assert max(r["snapshot_age"] for r in read_metrics(cluster.run_dir)[:newest]) <= 1
        assert cluster.wait(timeout=300)[:2] == [0, 0], cluster.output(0)[-4000:]
        log = cluster.output(0)
    ((source, step),) = [r for r in resumes(cluster) if r[0] != "fresh start"]
    assert source == "peer keepers' memory", log[-3000:]
    assert max(protected) <= step < newest - 1, (protected, step, newest)  # the step being coded was not taken
    assert_matches(latest_losses(cluster.run_dir), reference)


PEER_S = 2.0


@pytest.mark.skipif(shutil.which("etcd") is None, reason=f"the etcd server is not installed: {etcd.INSTALL_HINT}")
def test_the_rendezvous_hosts_node_hung_is_left_behind_under_etcd(tmp_path, reference):
    """Node 0 SIGSTOPped (agent, worker, keeper and etcd member; sockets open): under the c10d
    rendezvous its agent holds the store and the job would end; under etcd the other two members
    keep it. The survivors' keepers see node 0's keeper silent for fault.peer_timeout_s (not the
    ranks' ten-minute hang timeout), end their ranks, and the job goes on with 2 nodes from memory."""
    extra = [f"fault.peer_timeout_s={PEER_S:g}", "fault.hang_timeout_s=600"]
    with LocalCluster(
        nodes=3, nproc_per_node=1, min_nodes=2, overrides=BASE + extra, run_root=tmp_path, name="run", rdzv="etcd"
    ) as cluster:
        wait_for_step(cluster, 8)
        cluster.freeze_node(0)
        frozen = time.monotonic()
        deadline = frozen + 300
        while not resumes(cluster, node=1):  # rank 0 is on node 1 after the recovery
            assert time.monotonic() < deadline, cluster.output(1)[-4000:]
            time.sleep(0.2)
        recovered_s = time.monotonic() - frozen
        while None in cluster.poll()[1:]:  # node 0 stays stopped until the cluster ends
            assert time.monotonic() < deadline, cluster.output(1)[-4000:]
            time.sleep(0.2)
        assert cluster.poll()[1:] == [0, 0], cluster.output(1)[-4000:]
        log = cluster.output(1)
    assert "the keeper of node0 has not answered for" in log and "ending this node's ranks" in log, log[-3000:]
    ((source, step),) = resumes(cluster, node=1)
    assert source == "peer keepers' memory" and step >= 8 - 2, log[-3000:]
    assert PEER_S <= recovered_s <= PEER_S + 60, recovered_s  # the heartbeat's timeout plus the restart
    assert_matches(latest_losses(cluster.run_dir), reference)
