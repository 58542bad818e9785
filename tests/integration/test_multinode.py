"""Two torchrun agents on localhost, joined by a c10d rendezvous, train as one job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from conftest import launch, read_metrics
from test_topologies import BASE, assert_follows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_match_single_node(tmp_path):
    launch(BASE + ["parallel.dp_shard=2"], nproc=2, root=tmp_path / "single")
    reference = read_metrics(tmp_path / "single" / "run")
    (tmp_path / "multi").mkdir()
    port = free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-agents",
        "-m", "resurgo.launch.train", *BASE, "parallel.dp_shard=2", f"run.root={tmp_path / 'multi'}",
        "run.name=run", "train.device=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outputs
    assert_follows(read_metrics(tmp_path / "multi" / "run"), reference)
