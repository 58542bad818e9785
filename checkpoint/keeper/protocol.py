"""What workers and their keeper agree on: where the socket is, how messages look.

Messages are JSON objects, one per line, over a Unix stream socket in a directory only this user can
open (0700). A request names its `op`; a reply has `ok` and, when false, an `error` that says what
to do. What each operation takes and returns is in messages.py; `call` sends one typed request and
types its reply, and `ask` is the same for callers to whom a keeper is optional (None: none answers). Tensor bytes never travel over the socket: they go through shared memory laid out by
`state.slot_layout.SlotLayout`, which both sides derive from the same JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import CheckpointError
from .messages import Op as Op  # re-exported: clients name operations here
from .messages import Reply, Request

PROTOCOL_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_OWNER = re.compile(r"\.p(\d+)\.r-?\d+\.s\d+\.\d+$")


class KeeperError(CheckpointError):
    """The keeper refused a request; the message says what to do."""


class KeeperGone(ConnectionError):
    """The keeper cannot be reached (not started yet, or it died): memory snapshots are unavailable."""


def node_id() -> str:
    """This node's stable identity: RESURGO_NODE_ID (set by the launch scripts), else the hostname."""
    return os.environ.get("RESURGO_NODE_ID") or socket.gethostname()


def run_id(run_dir: Path | str, *, node: str | None = None) -> str:
    """A short id for a run folder, safe in file and segment names, unique per absolute path and node.

    The node (`node`, else RESURGO_NODE_ID) counts only when set: nodes simulated on one machine then
    never take each other's shared memory for their own.
    """
    path = os.path.abspath(run_dir)
    node = os.environ.get("RESURGO_NODE_ID", "") if node is None else node
    digest = hashlib.sha1((path + ("\0" + node if node else "")).encode()).hexdigest()[:10]
    return f"{_UNSAFE.sub('_', os.path.basename(path))[:24]}-{digest}"


def socket_dir() -> Path:
    """This user's private folder for keeper sockets and locks (created 0700, checked if it exists)."""
    base = os.environ.get("RESURGO_KEEPER_DIR")
    if base:
        path = Path(base)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "resurgo"
    else:
        path = Path("/tmp") / f"resurgo-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise KeeperError(
            f"{path} is owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}; the keeper needs a folder "
            "only this user can open: remove it, or point RESURGO_KEEPER_DIR at a private folder"
        )
    return path


def socket_path(rid: str) -> Path:
    return socket_dir() / f"{rid}.sock"


def lock_path(rid: str) -> Path:
    return socket_dir() / f"{rid}.lock"


def segment_prefix(rid: str) -> str:
    return f"resurgo.{rid}."


def segment_name(rid: str, *, keeper_id: str, rank: int, slot: int, serial: int, pid: int | None = None) -> str:
    """A keeper numbers its segments: a name is never used twice, as a worker keeps what it mapped. The
    keeper's pid in the name lets any later keeper on the node reclaim them once it is dead."""
    return f"{segment_prefix(rid)}{keeper_id}.p{os.getpid() if pid is None else pid}.r{rank}.s{slot}.{serial}"


def segment_owner(name: str) -> int | None:
    """The pid of the keeper that made segment `name`, None for a name without one."""
    found = _OWNER.search(name)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class StoreTarget:
    """Where and how a run's checkpoints are written; sent by every worker when it registers."""

    root: str
    keep: int
    compression: str
    topology: Mapping[str, Any]  # as the trainer describes it; world_size is added
    world_size: int
    token: str  # hex, one per run incarnation: names the coordination and temporary folders

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> StoreTarget:
        token = str(data["token"])
        if not token or any(c not in "0123456789abcdef" for c in token):
            raise KeeperError(f"store token {token!r} must be lowercase hex")
        return StoreTarget(
            str(data["root"]),
            int(data["keep"]),
            str(data["compression"]),
            dict(data["topology"]),
            int(data["world_size"]),
            token,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "keep": self.keep,
            "compression": self.compression,
            "topology": dict(self.topology),
            "world_size": self.world_size,
            "token": self.token,
        }

    @property
    def coord(self) -> Path:
        return Path(self.root) / f".keeper-{self.token}"


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"expected a JSON object, got {type(message).__name__}")
    return message


class Client:
    """One connection to a keeper; requests are answered in order."""

    def __init__(self, path: Path, *, timeout: float = 900.0) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            raise KeeperGone(f"no keeper answers at {path} ({e})") from None
        self._sock = sock
        self._file = sock.makefile("rwb")

    def call(self, request: Request) -> Any:
        """The typed reply (of type `request.reply`); KeeperError if the keeper refused, KeeperGone if
        the connection broke."""
        return call(self, request)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """The raw reply to one frame (code sends typed requests by `call`, which comes through here)."""
        try:
            self._file.write(encode({"op": op, **fields}))
            self._file.flush()
            line = self._file.readline()
        except OSError as e:
            raise KeeperGone(f"the keeper at {self.path} stopped answering ({e})") from None
        if not line:
            raise KeeperGone(f"the keeper at {self.path} closed the connection (it exited or was killed)")
        reply = decode(line)
        if not reply.get("ok"):
            raise KeeperError(str(reply.get("error", "the keeper refused the request")))
        return reply

    def close(self) -> None:
        for closing in (self._file.close, self._sock.close):
            try:
                closing()
            except OSError:
                pass


class Requester(Protocol):
    def request(self, op: str, **fields: Any) -> dict[str, Any]: ...


def call(client: Requester, request: Request) -> Any:
    """Send a typed request through `client`'s raw `request` and type its reply."""
    frame = request.to_json()
    reply: type[Reply] = request.reply
    return reply.from_json(client.request(frame.pop("op"), **frame))


def ask(client: Requester | None, request: Request) -> Any:
    """`call`, or None when no keeper answers or it refused: for callers to whom a keeper is optional."""
    if client is None:
        return None
    try:
        return call(client, request)
    except (KeeperGone, KeeperError, OSError):
        return None
