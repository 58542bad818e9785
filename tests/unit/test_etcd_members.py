"""The etcd members the launchers start for a rendezvous that survives any one node: arguments, start, failover."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError
from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend

from resurgo.launch import etcd, etcd_rendezvous
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
    """Raft: what one member wrote, the other two still serve, and accept writes, after it was
    SIGKILLed; run again on its data folder, it rejoins, and the loss of another is survived too."""
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
        assert etcd.first_healthy(members, timeout=30) == members[1]  # where a node with no member turns
        survivor = etcd_client.Client(host="127.0.0.1", port=members[1].client_port)
        assert survivor.read("/rendezvous", quorum=True).value == "round 1"
        survivor.write("/rendezvous", "round 2")
        assert (
            etcd_client.Client(host="127.0.0.1", port=members[2].client_port).read("/rendezvous", quorum=True).value
            == "round 2"
        )
        with pytest.raises(TimeoutError, match=r"\['node0'\] not healthy"):
            etcd.wait_healthy(members, timeout=0.5)
        # A replacement runs the lost member on its data folder: it catches up, and the next loss is survived.
        procs[0] = etcd.spawn(
            members[0], members, tmp_path / "node0", "test", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        etcd.wait_healthy(members, timeout=30)
        procs[1].kill()
        procs[1].wait(timeout=10)
        etcd.wait_healthy([members[0], members[2]], timeout=30)
        revived = etcd_client.Client(host="127.0.0.1", port=members[0].client_port)
        assert revived.read("/rendezvous", quorum=True).value == "round 2"
        revived.write("/rendezvous", "round 3")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


class _FlakyEtcd:
    """torch's etcd-v2 backend as seen while etcd elects a leader: the first calls fail."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls <= self.failures:
            raise RendezvousConnectionError("The connection to etcd has failed.")
        return (b"state", 7)


@pytest.mark.parametrize("failures, retry_s, survives", [(3, 30.0, True), (10**9, 0.3, False)])
def test_the_rendezvous_backend_rides_out_a_leader_election_but_not_a_lost_majority(
    monkeypatch, failures, retry_s, survives
):
    flaky = _FlakyEtcd(failures)
    monkeypatch.setattr(EtcdRendezvousBackend, "get_state", lambda self: flaky())
    monkeypatch.setattr(EtcdRendezvousBackend, "set_state", lambda self, state, token=None: flaky(state, token))
    monkeypatch.setattr(etcd_rendezvous, "PAUSE_S", 0.01)
    inner = EtcdRendezvousBackend.__new__(EtcdRendezvousBackend)
    backend = etcd_rendezvous.RetryingEtcdBackend(inner, retry_s)
    if survives:
        assert backend.get_state() == (b"state", 7) and flaky.calls == failures + 1
        assert backend.set_state(b"new", 7) == (b"state", 7)
    else:
        with pytest.raises(RendezvousConnectionError):
            backend.set_state(b"new", 7)
        assert flaky.calls > 3


def test_torchrun_finds_the_retrying_backend_by_its_name():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="torchrun.handlers") if e.name == "resurgo-etcd"]
    assert entry.load()() is etcd_rendezvous.create_rendezvous_handler


@pytest.mark.skipif(shutil.which("etcd") is None, reason=f"the etcd server is not installed: {etcd.INSTALL_HINT}")
def test_a_new_machine_takes_a_lost_members_seat_and_the_next_loss_is_survived(tmp_path):
    """A member started on an empty data folder while the others run: it replaces the lost member of
    its name (etcd's member remove, then add), at its own new address, and catches up. The lost member
    is the leader, so the new one starts while the others elect another (no member answers healthy)."""
    etcd_client = pytest.importorskip("etcd")
    members = [etcd.Member(f"node{i}", "127.0.0.1", free_port(), free_port()) for i in range(3)]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [etcd.spawn(m, members, tmp_path / m.name, "test", **quiet) for m in members]
    try:
        etcd.wait_healthy(members, timeout=60)
        lost = next(i for i, m in enumerate(members) if b"StateLeader" in etcd._call(m, "GET", "/v2/stats/self"))
        survivor = members[(lost + 1) % 3]
        etcd_client.Client(host="127.0.0.1", port=survivor.client_port).write("/rendezvous", "round 1")
        procs[lost].kill()
        procs[lost].wait(timeout=10)
        new = etcd.Member(members[lost].name, "127.0.0.1", free_port(), free_port())  # another machine, its disk empty
        cluster = [new if i == lost else m for i, m in enumerate(members)]
        procs[lost] = etcd.spawn(new, cluster, tmp_path / "new-machine", "test", **quiet)
        etcd.wait_healthy(cluster, timeout=30)
        seats = json.loads(etcd._call(new, "GET", "/v2/members"))["members"]
        assert sorted((m["name"], m["peerURLs"][0]) for m in seats) == [(m.name, m.peer_url) for m in cluster]
        procs[(lost + 1) % 3].kill()  # Raft's majority is the new machine's and the third member's now
        procs[(lost + 1) % 3].wait(timeout=10)
        etcd.wait_healthy([new, members[(lost + 2) % 3]], timeout=30)
        joined = etcd_client.Client(host="127.0.0.1", port=new.client_port)
        assert joined.read("/rendezvous", quorum=True).value == "round 1"
        joined.write("/rendezvous", "round 2")
    finally:
        for proc in procs:
            proc.kill()


@pytest.mark.skipif(shutil.which("etcd") is None, reason=f"the etcd server is not installed: {etcd.INSTALL_HINT}")
def test_a_node_is_alive_while_its_key_changes_and_only_the_dead_are_dropped(tmp_path):
    """Heartbeats in the rendezvous state are judged by each node's key in etcd: a live node's is
    fresh however long ago it wrote the state (torch would drop it), a node whose key stopped
    changing is dropped within a second, and nobody is judged dead before this node has refreshed
    its own key a few times."""
    import pickle
    import time
    from datetime import datetime, timedelta, timezone

    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc, _RendezvousState
    from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import create_backend

    member = etcd.Member("node0", "127.0.0.1", free_port(), free_port())
    proc = etcd.spawn(member, [member], tmp_path / "etcd", "test", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        etcd.wait_healthy([member], timeout=60)

        def backend() -> etcd_rendezvous.RetryingEtcdBackend:
            params = RendezvousParameters("etcd-v2", member.endpoint, "job", min_nodes=1, max_nodes=4)
            return etcd_rendezvous.RetryingEtcdBackend(create_backend(params)[0], retry_s=10.0)

        here, peer, gone, never = (_NodeDesc("127.0.0.1", pid, 0) for pid in (1, 2, 3, 4))
        state = _RendezvousState()
        stale = datetime.now(timezone.utc) - timedelta(minutes=1)
        state.participants = {here: 0, peer: 1, gone: 2, never: 3}
        state.last_heartbeats = dict.fromkeys(state.participants, stale)
        mine, theirs, lost = backend(), backend(), backend()
        for kept, node in ((mine, here), (theirs, peer)):
            kept.keep_alive(repr(node))
        lost._node = repr(gone)
        lost.refresh()  # wrote its key once, then died
        written = mine.set_state(pickle.dumps(state))
        assert written is not None and written[2]

        def alive() -> dict:
            now = datetime.now(timezone.utc)
            seen = pickle.loads(mine.get_state()[0]).last_heartbeats
            return {node.pid: (now - at).total_seconds() < 5 for node, at in seen.items()}

        assert alive() == {1: True, 2: True, 3: True, 4: True}  # too soon to judge anyone dead
        time.sleep((etcd_rendezvous.STILL_REFRESHES + 3) * etcd_rendezvous.REFRESH_S)
        assert alive() == {1: True, 2: True, 3: False, 4: False}
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_a_rendezvous_timeout_that_is_no_positive_number_of_seconds_is_refused(value):
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    params = RendezvousParameters("resurgo-etcd", "127.0.0.1:1", "job", 1, 3, last_call_timeout=value)
    with pytest.raises(ValueError, match=f"last_call_timeout={value}"):
        etcd_rendezvous.create_rendezvous_handler(params)


@pytest.mark.skipif(shutil.which("etcd") is None, reason=f"the etcd server is not installed: {etcd.INSTALL_HINT}")
def test_the_rendezvous_waits_fractions_of_a_second_where_torch_takes_whole_ones(tmp_path):
    """A last call and an etcd request timeout under a second: torch parses both as whole seconds."""
    from datetime import timedelta

    from torch.distributed.elastic.rendezvous import RendezvousParameters

    member = etcd.Member("node0", "127.0.0.1", free_port(), free_port())
    proc = etcd.spawn(member, [member], tmp_path / "etcd", "test", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        etcd.wait_healthy([member], timeout=60)
        params = RendezvousParameters(
            "resurgo-etcd", member.endpoint, "job", 1, 3, read_timeout="0.5", last_call_timeout="0.25"
        )
        handler = etcd_rendezvous.create_rendezvous_handler(params)
        assert handler.settings.timeout.last_call == timedelta(seconds=0.25)
        assert handler._state_holder._backend._client.read_timeout == 0.5
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.skipif(shutil.which("etcd") is None, reason=f"the etcd server is not installed: {etcd.INSTALL_HINT}")
def test_a_key_written_between_the_stores_read_and_its_watch_is_found(tmp_path):
    """torch's store watches a folder that did not exist from "now": a key written in between is
    missed until the wait times out (300 s in an agent). Here it is found within a watch's length."""
    import time
    from datetime import timedelta

    import etcd as etcd_client

    member = etcd.Member("node0", "127.0.0.1", free_port(), free_port())
    proc = etcd.spawn(member, [member], tmp_path / "etcd", "test", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        etcd.wait_healthy([member], timeout=60)
        client = etcd_client.Client(host="127.0.0.1", port=member.client_port)
        store = etcd_rendezvous.PromptEtcdStore(client, "/torch/elastic/store", retry_s=5.0)
        store.set_timeout(timedelta(seconds=20))
        watch, written = client.watch, []

        def write_then_watch(*args, **kwargs):  # rank 0 publishes its address just before the watch starts
            if not written:
                written.append(True)
                store.set("MASTER_ADDR", "10.0.0.1")
            return watch(*args, **kwargs)

        client.watch = write_then_watch
        start = time.monotonic()
        assert store.get("MASTER_ADDR") == b"10.0.0.1"
        assert time.monotonic() - start < 10 * etcd_rendezvous.WATCH_S
    finally:
        proc.kill()
        proc.wait(timeout=10)
