"""The keepers' peer port against strangers: nothing is read or allocated before a client proves it
knows the run's secret, which itself never travels; frames and connections are capped."""

from __future__ import annotations

import resource
import socket
import struct
import threading
import time

import pytest

from resurgo.checkpoint.erasure import wire as peer_wire
from resurgo.checkpoint.erasure.wire import PeerClient, PeerError, PeerRefused, PeerServer, recv_frame, send_frame


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(peer_wire, "MAX_CONNECTIONS", 8)
    monkeypatch.setattr(peer_wire, "HANDSHAKE_S", 0.5)
    started = PeerServer(
        host="127.0.0.1", handler=lambda header, payload: ({"got": payload.nbytes}, None), secrets=lambda: {"s3cret"}
    )
    started.start()
    yield started
    started.stop()


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def closed(sock: socket.socket) -> bool:
    """Whether the other end closed (a reset when it left our bytes unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_stranger_claiming_huge_frames_is_refused_before_anything_is_allocated(server):
    before = peak_rss_mb()
    for _ in range(2):
        with connect(server.address) as sock:
            sock.recv(64)  # the greeting
            sock.sendall(struct.pack("!IQ", 16, 900 * 2**20) + b'{"op":"contribute"}' + b"\0" * 64)
            reply, _ = recv_frame(sock)
            assert reply == {"ok": False, "error": "wrong run secret: this keeper serves another run"}
            assert closed(sock)
    assert peak_rss_mb() - before < 100
    with pytest.raises(PeerRefused, match="wrong run secret"):
        PeerClient(server.address, secret="guess")


def test_an_authenticated_peer_gets_answers_and_an_oversized_frame_ends_its_connection(server, monkeypatch):
    monkeypatch.setattr(peer_wire, "MAX_PAYLOAD", 2000)
    client = PeerClient(server.address, secret="s3cret")
    assert client.request("ping", b"x" * 1000)[0]["got"] == 1000
    with pytest.raises(PeerError):
        client.request("ping", b"x" * 4000)
    client.close()


def test_idle_connections_are_capped_and_dropped_after_the_handshake_time(server):
    before = set(threading.enumerate())  # other tests' connections may still be closing
    idle = [connect(server.address) for _ in range(20)]
    time.sleep(0.2)
    serving = [t for t in set(threading.enumerate()) - before if t.name == "resurgo-peer-conn"]
    assert 1 <= len(serving) <= 8
    for sock in idle:
        sock.settimeout(5)
        sock.recv(64)  # the greeting (the first 8), or the close
        assert closed(sock)
        sock.close()
    time.sleep(0.3)
    assert not [t for t in set(threading.enumerate()) - before if t.name == "resurgo-peer-conn"]
    assert PeerClient(server.address, secret="s3cret").request("ping")[0]["ok"]


def test_the_secret_never_travels():
    received = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))

    def fake_keeper() -> None:
        conn, _ = listener.accept()
        conn.sendall(peer_wire._HELLO + b"n" * peer_wire._NONCE)
        received.extend(conn.recv(32))
        send_frame(conn, {"ok": True})
        header, payload = recv_frame(conn)
        received.extend(repr(header).encode() + bytes(payload))
        send_frame(conn, {"ok": True})
        conn.close()

    thread = threading.Thread(target=fake_keeper)
    thread.start()
    client = PeerClient(f"127.0.0.1:{listener.getsockname()[1]}", secret="t0p-s3cret")
    client.request("inventory", b"payload")
    client.close()
    thread.join(5)
    listener.close()
    assert (
        received
        and b"t0p-s3cret" not in received
        and peer_wire.proof("t0p-s3cret", b"n" * peer_wire._NONCE) in received
    )
