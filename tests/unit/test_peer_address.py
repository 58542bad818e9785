"""Where keepers listen for their peers, and the check at start that every node's keeper reaches the others."""

from __future__ import annotations

import socket
import time

import pytest
from test_keeper import serve  # noqa: F401  (fixture)

from resurgo.checkpoint.erasure.coding import ErasureSetup
from resurgo.checkpoint.erasure.wire import PeerServer, advertised_host, unreachable
from resurgo.checkpoint.errors import PeerUnreachable
from resurgo.checkpoint.keeper.protocol import Client, node_id, socket_path
from resurgo.checkpoint.keeper.watch import HangWatch
from resurgo.checkpoint.recovery.peers import _check_reach


def test_the_address_is_the_route_to_the_rendezvous_host_unless_set(monkeypatch):
    monkeypatch.delenv("RESURGO_PEER_HOST", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert advertised_host() == "127.0.0.1"  # every node on this machine
    monkeypatch.setenv("RESURGO_PEER_HOST", "10.9.8.7")
    assert advertised_host() == "10.9.8.7"
    monkeypatch.delenv("RESURGO_PEER_HOST")
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "10.1.2.3")
    assert advertised_host() == "10.1.2.3"  # no rendezvous known: the host name's address
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    assert advertised_host() == "127.0.0.1"  # a loopback name: one machine


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_keeper_that_answers_is_reachable_even_before_it_knows_the_secret():
    server = PeerServer(host="127.0.0.1", handler=lambda h, p: ({}, None), secrets=lambda: {"s3cret"})
    server.start()
    try:
        assert unreachable(server.address, timeout=5) is None
    finally:
        server.stop()
    assert "refused" in unreachable(f"127.0.0.1:{closed_port()}", timeout=5).lower()
    with socket.socket() as silent:  # listening, never greeting: a hung keeper's port
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert "timed out" in unreachable(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)


def test_unreachable_peers_are_one_clear_error_on_every_rank():
    class Gather:
        def all_gather(self, mine):
            return [mine, None, {"node": "node1", "unreachable": {"node0": "127.0.0.1:5: Connection refused"}}]

    with pytest.raises(
        PeerUnreachable, match="node1 -> node0 at 127.0.0.1:5: Connection refused(.|\n)*RESURGO_PEER_HOST"
    ):
        _check_reach(Gather(), {"node": "node0", "unreachable": {}})
    _check_reach(
        type("Fine", (), {"all_gather": lambda self, mine: [mine, None]})(), {"node": "node0", "unreachable": {}}
    )


def test_a_keeper_reports_the_peers_of_its_plan_it_cannot_reach(serve):  # noqa: F811
    keeper = serve()
    client = Client(socket_path(keeper.rid), timeout=60)
    me, address = node_id(), client.request("hello")["peer_address"]
    plan = ErasureSetup(
        token="ab12",
        created=time.time(),
        secret="s" * 32,
        nodes=(me, "gone"),
        ranks={me: (0,), "gone": (1,)},
        replicas=(),
        k=1,
        m=1,
        peers={me: address, "gone": f"127.0.0.1:{closed_port()}"},
        world_size=2,
        topology={"dp_shard": 2},
    )
    client.request("protect", plan=plan.to_json())
    reply = client.request("reach")
    assert reply["node"] == me and list(reply["unreachable"]) == ["gone"]
    client.close()


def test_a_silent_peer_keeper_is_reported_after_the_peer_timeout_not_the_hang_timeout():
    """A greeting peer keeps quiet; one that stops greeting (hung: its port still accepts) is reported
    once fault.peer_timeout_s passed, while the ranks' hang timeout is ten minutes."""
    server = PeerServer(host="127.0.0.1", handler=lambda h, p: ({}, None), secrets=lambda: {"s3cret"})
    server.start()
    watch = HangWatch(timeout_s=600.0, peer_timeout_s=1.5)
    try:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            watch.watch_peers({"node1": server.address, "node2": f"127.0.0.1:{silent.getsockname()[1]}"})
            started = time.monotonic()
            while (trouble := watch.trouble()) is None:
                assert time.monotonic() - started < 10, "the silent peer was never reported"
                time.sleep(0.05)
            waited = time.monotonic() - started
        assert trouble.peer_lost and "node2" in trouble.reason and "fault.peer_timeout_s=1.5" in trouble.reason
        assert 1.5 <= waited < 4.0, waited
        assert watch.trouble() is None  # reported once; node1 still greets
    finally:
        watch.stop()
        server.stop()
