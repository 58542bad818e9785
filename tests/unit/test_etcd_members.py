"""The etcd members the launchers start for a rendezvous that survives any one node: arguments, start, failover."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from resurgo.launch import etcd
from resurgo.launch.local_nodes import free_port


def test_cluster_entries_parse_with_default_or_explicit_ports():
    members = etcd.parse_cluster("node0=10.0.0.1, node1=10.0.0.2:3379:3380")
    assert members == [etcd.Member("node0", "10.0.0.1"), etcd.Member("node1", "10.0.0.2", 3379, 3380)]
    assert members[1].endpoint == "10.0.0.2:3379" and members[0].peer_url == "http://10.0.0.1:2380"
    assert etcd.parse_cluster(etcd.format_cluster(members)) == members


@pytest.mark.parametrize("text", ["", "node0", "node0=", "node0=h:1", "node0=h:a:b", "a=h,a=g"])
def test_a_malformed_cluster_is_refused_with_the_expected_form(text):
    with pytest.raises(ValueError, match="NAME=HOST|one entry per member"):
        etcd.parse_cluster(text)


def test_the_command_line_names_what_is_wrong(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "resurgo.launch.etcd", "--data-dir", str(tmp_path), "--token", "t", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    wrong_name = run("--name", "node9", "--cluster", "node0=127.0.0.1")
    assert wrong_name.returncode == 2 and "--name node9 is not in --cluster" in wrong_name.stderr
    malformed = run("--name", "node0", "--cluster", "node0=127.0.0.1:1")
    assert malformed.returncode == 2 and "NAME=HOST or NAME=HOST:CLIENT_PORT:PEER_PORT" in malformed.stderr


@pytest.mark.skipif(shutil.which("etcd") is None, reason=f"the etcd server is not installed: {etcd.INSTALL_HINT}")
def test_three_members_keep_the_rendezvous_state_through_the_loss_of_any_one(tmp_path):
    """Raft: what one member wrote, the other two still serve, and accept writes, after it was SIGKILLed."""
    etcd_client = pytest.importorskip("etcd")  # python-etcd, what torch's etcd-v2 rendezvous speaks
    members = [etcd.Member(f"node{i}", "127.0.0.1", free_port(), free_port()) for i in range(3)]
    procs = [
        etcd.spawn(m, members, tmp_path / m.name, "test", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for m in members
    ]
    try:
        etcd.wait_healthy(members, timeout=60)
        etcd_client.Client(host="127.0.0.1", port=members[0].client_port).write("/rendezvous", "round 1")
        procs[0].kill()
        procs[0].wait(timeout=10)
        etcd.wait_healthy(members[1:], timeout=30)  # a new leader, if the lost member led
        survivor = etcd_client.Client(host="127.0.0.1", port=members[1].client_port)
        assert survivor.read("/rendezvous", quorum=True).value == "round 1"
        survivor.write("/rendezvous", "round 2")
        assert (
            etcd_client.Client(host="127.0.0.1", port=members[2].client_port).read("/rendezvous", quorum=True).value
            == "round 2"
        )
        with pytest.raises(TimeoutError, match=r"\['node0'\] not healthy"):
            etcd.wait_healthy(members, timeout=0.5)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
