"""Simulated nodes on localhost (a keeper and a torchrun agent each, joined by a c10d rendezvous) train as one job."""

from __future__ import annotations

import time

from test_topologies import BASE, assert_follows

from conftest import launch, read_metrics
from resurgo.launch.local_nodes import LocalCluster


def test_two_nodes_match_single_node(tmp_path):
    launch(BASE + ["parallel.dp_shard=2"], nproc=2, root=tmp_path / "single")
    reference = read_metrics(tmp_path / "single" / "run")
    with LocalCluster(
        nodes=2,
        nproc_per_node=1,
        overrides=BASE + ["parallel.dp_shard=2", "train.device=cpu"],
        run_root=tmp_path / "multi",
        name="run",
    ) as cluster:
        codes = cluster.wait(timeout=240)
        assert codes == [0, 0], [cluster.output(i)[-3000:] for i in range(2)]
    assert_follows(read_metrics(tmp_path / "multi" / "run"), reference)


def test_kill_node_leaves_none_of_its_processes(tmp_path):
    overrides = ["experiment=smoke", "train.steps=100000", "train.device=cpu"]
    with LocalCluster(
        nodes=2, nproc_per_node=1, min_nodes=1, overrides=overrides, run_root=tmp_path, name="run"
    ) as cluster:
        metrics = cluster.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().strip()):
            assert time.monotonic() < deadline, [cluster.output(i)[-3000:] for i in range(2)]
            time.sleep(0.2)
        node1 = cluster.node_pids(1)
        assert len(node1) >= 3, node1  # its agent, its keeper and at least one worker
        cluster.kill_node(1)
        assert cluster.node_pids(1) == set()
        assert cluster.node_pids(0), "node 0 must outlive node 1"
    assert cluster.node_pids(0) == set()
