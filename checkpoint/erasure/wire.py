"""Keeper-to-keeper messages over TCP: a JSON header and raw bytes, framed by their lengths.

Parity contributions, fetches of snapshot bytes during a recovery and small notices travel here,
never over the training process groups, so a slow exchange cannot stall or deadlock a training
collective.

A connection starts with a challenge: the server sends a random nonce, the client answers with the
HMAC-SHA256 of it under the run's secret (handed to the keepers by their workers), and the server
reads nothing else until the answer matches a secret it accepts. So the secret never travels, a
stranger can neither read snapshot memory nor write parity, and what a stranger sends costs the
keeper 32 bytes and one thread for at most HANDSHAKE_S; connections are capped (MAX_CONNECTIONS),
and so is every frame an authenticated peer sends (MAX_PAYLOAD). What it does not give: privacy
(snapshot bytes travel in clear: keep the keepers' ports on a private network, or under WireGuard
or IPsec) and protection from a peer that knows the secret (any rank's worker does).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from ..scratch import scratch

log = logging.getLogger(__name__)

_RECEIVE_SLOT = 3  # the scratch buffer a serving thread receives payloads into
_HEAD = struct.Struct("!IQ")  # header bytes, payload bytes
_HELLO = b"RSGO1"  # what a keeper's port says first (with its nonce): the protocol and its version
_NONCE = 32
MAX_HEADER = 64 * 2**20
MAX_PAYLOAD = 64 * 2**20  # the largest frame a keeper receives: pieces are 4 MiB, reads 16 MiB
MAX_CONNECTIONS = 256  # served at once; more are closed at accept
HANDSHAKE_S = 10.0  # for a client to prove it knows the secret

Handler = Callable[[dict[str, Any], memoryview], tuple[dict[str, Any], bytes | memoryview | None]]


class PeerError(ConnectionError):
    """A peer keeper cannot be reached, refused a request, or broke the connection."""


class PeerRefused(PeerError):
    """A peer keeper answered but refused: it serves another run, or no longer this plan."""


def proof(secret: str, nonce: bytes) -> bytes:
    return hmac.new(secret.encode(), nonce, hashlib.sha256).digest()


def background_priority() -> None:
    """Run the calling thread only on otherwise idle CPU time (SCHED_IDLE; Linux threads have their own
    policy). Coding and serving peers are never on the training's critical path: on a machine whose
    cores train, a nice value still takes a share from training, an idle thread takes only the gaps
    (data loading, collectives) and shows up as protection lag instead of slower steps."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except (AttributeError, OSError):
            pass


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview | None = None) -> None:
    body = json.dumps(header, separators=(",", ":")).encode()
    data = memoryview(payload if payload is not None else b"").cast("B")
    sock.sendall(_HEAD.pack(len(body), data.nbytes) + body)
    if data.nbytes:
        sock.sendall(data)


def recv_frame(
    sock: socket.socket, *, into: memoryview | None = None, reuse: bool = False, max_payload: int | None = None
) -> tuple[dict[str, Any], memoryview] | None:
    """The next frame, or None when the peer closed the connection between frames; a payload of
    exactly `into`'s size is received straight into it (no copy), others, with `reuse`, into this
    thread's receive buffer (valid until its next frame), else into a new buffer."""
    head = _recv_exact(sock, _HEAD.size, eof_ok=True)
    if head is None:
        return None
    hlen, plen = _HEAD.unpack(head)
    if hlen > MAX_HEADER or (max_payload is not None and plen > max_payload):
        raise PeerError(f"a peer sent a frame of {hlen} + {plen} bytes: not a resurgo keeper, or a different version")
    header = json.loads(bytes(_recv_exact(sock, hlen)))
    target = into if into is not None and into.nbytes == plen else None
    if target is None and reuse:
        target = memoryview(scratch(plen, slot=_RECEIVE_SLOT))
    payload = _recv_exact(sock, plen, into=target) if plen else memoryview(b"")
    return header, payload


def _recv_exact(
    sock: socket.socket, n: int, *, eof_ok: bool = False, into: memoryview | None = None
) -> memoryview | None:
    view = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if eof_ok and got == 0:
                return None
            raise PeerError(f"connection closed after {got} of {n} bytes")
        got += k
    return view


class PeerClient:
    """One connection to a peer keeper at `address` ("host:port"); requests are answered in order."""

    def __init__(self, address: str, *, secret: str, timeout: float = 60.0) -> None:
        self.address, self.secret = address, secret
        host, port = address.rsplit(":", 1)
        try:
            self._sock = socket.create_connection((host, int(port)), timeout=timeout)
        except OSError as e:
            raise PeerError(f"the keeper at {address} cannot be reached ({e})") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        try:
            nonce = _hello(self._sock, address)
            self._sock.sendall(proof(secret, nonce))
            verdict = recv_frame(self._sock)
        except OSError as e:
            self.close()
            raise PeerError(f"the keeper at {address} stopped answering ({e})") from None
        except PeerError:
            self.close()
            raise
        if verdict is None or not verdict[0].get("ok"):
            self.close()
            raise PeerRefused(
                f"the keeper at {address} refused the connection: {(verdict or ({},))[0].get('error', 'closed')}"
            )

    def request(
        self, op: str, payload: bytes | memoryview | None = None, *, into: memoryview | None = None, **fields: Any
    ) -> tuple[dict[str, Any], memoryview]:
        """The reply and its payload (received into `into` when that has the payload's size)."""
        with self._lock:
            try:
                send_frame(self._sock, {"op": op, **fields}, payload)
                frame = recv_frame(self._sock, into=into)
            except OSError as e:
                raise PeerError(f"the keeper at {self.address} stopped answering ({e})") from None
        if frame is None:
            raise PeerError(f"the keeper at {self.address} closed the connection (it exited or was killed)")
        reply, data = frame
        if not reply.get("ok"):
            raise PeerRefused(f"the keeper at {self.address} refused {op}: {reply.get('error')}")
        return reply, data

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """End a request another thread waits in (a hung peer may never answer it): it fails at once."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def advertised_host() -> str:
    """The address this node's keeper listens on for its peers: RESURGO_PEER_HOST when set, else the
    local end of the route to the rendezvous host (MASTER_ADDR, which torchrun gives every worker and
    thus every keeper a worker starts), else the host name's address when that is not loopback, else
    loopback (one machine). No packet is sent: connecting a UDP socket only picks the route."""
    explicit = os.environ.get("RESURGO_PEER_HOST")
    if explicit:
        return explicit
    master = os.environ.get("MASTER_ADDR")
    if master:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
                return probe.getsockname()[0]
        except OSError:
            pass
    try:
        named = socket.gethostbyname(socket.gethostname())
        if not named.startswith("127."):
            return named
    except OSError:
        pass
    return "127.0.0.1"


def _hello(sock: socket.socket, address: str) -> bytes:
    """The nonce a keeper's port greets a connection with."""
    hello = bytes(_recv_exact(sock, len(_HELLO) + _NONCE))
    if not hello.startswith(_HELLO):
        raise PeerError(f"{address} is not a resurgo keeper of this version (it greeted with {hello[: len(_HELLO)]!r})")
    return hello[len(_HELLO) :]


def unreachable(address: str, *, timeout: float) -> str | None:
    """Why the keeper at `address` cannot be reached, None when it greets (whatever secret it accepts:
    it may not know this run's yet). A hung keeper's kernel accepts the connection; its greeting never comes."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            _hello(sock, address)
    except (OSError, ValueError, PeerError) as e:
        return str(e) or type(e).__name__
    return None


class PeerServer:
    """Accepts peer connections on `host` (an ephemeral port) and answers each frame with `handler`."""

    def __init__(
        self,
        *,
        host: str,
        handler: Handler,
        secrets: Callable[[], Collection[str]],
        background: frozenset[str] = frozenset(),
    ) -> None:
        """`background`: ops whose connections are served at idle priority (the first frame decides:
        a connection carries one client's traffic; a recovery's reads are never among them)."""
        self.handler, self.secrets, self.background = handler, secrets, background  # secrets: those accepted now
        self.background_cpu_s = 0.0  # CPU time (user + system) its background connections used
        self._cpu_lock = threading.Lock()
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(0.2)
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="resurgo-peer-accept", daemon=True)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._refused = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                self._refused += 1
                if self._refused in (1, 100, 10_000):
                    log.warning("%d peer connection(s) refused: %d are served at once", self._refused, MAX_CONNECTIONS)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="resurgo-peer-conn", daemon=True).start()

    def _authenticate(self, conn: socket.socket) -> str | None:
        """The secret the client proves it knows, None (and a refusal sent) when it proves none."""
        conn.settimeout(HANDSHAKE_S)
        nonce = os.urandom(_NONCE)
        conn.sendall(_HELLO + nonce)
        given = bytes(_recv_exact(conn, hashlib.sha256().digest_size))  # all a stranger gets to send
        secret = next((s for s in self.secrets() if s and hmac.compare_digest(proof(s, nonce), given)), None)
        send_frame(
            conn, {"ok": True} if secret else {"ok": False, "error": "wrong run secret: this keeper serves another run"}
        )
        conn.settimeout(None)
        return secret

    def _answer(self, conn: socket.socket, secret: str, header: dict[str, Any], payload: memoryview) -> None:
        if secret not in self.secrets():
            send_frame(conn, {"ok": False, "error": "the run secret this connection proved is no longer accepted"})
            raise PeerError("a connection's secret expired")
        try:
            reply, data = self.handler(header, payload)
            send_frame(conn, {"ok": True, **reply}, data)
        except (KeyError, ValueError, TypeError, LookupError) as e:
            send_frame(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})

    def _serve(self, conn: socket.socket) -> None:
        first, background, mark = True, False, time.thread_time()
        try:  # a handler is done with a payload before the next frame is read: reuse one buffer
            secret = self._authenticate(conn)
            while secret is not None and (frame := recv_frame(conn, reuse=True, max_payload=MAX_PAYLOAD)) is not None:
                header, payload = frame
                if first and header.get("op") in self.background:
                    background_priority()
                    background = True
                first = False
                self._answer(conn, secret, header, payload)
                if background:  # this frame's CPU: receiving, handling, replying
                    now = time.thread_time()
                    with self._cpu_lock:
                        self.background_cpu_s += now - mark
                    mark = now
        except (OSError, PeerError, ValueError):
            pass
        finally:
            conn.close()
            self._slots.release()
