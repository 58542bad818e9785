"""Every keeper operation in one place: its request and its reply, as typed dataclasses.

On the socket a message is a flat JSON object (`protocol.encode`); a request names its `op`. The
server turns each request into its dataclass before a handler sees it, so a missing field, a field
of the wrong type or one nobody sends is a clear error reply, and the handler reads attributes, not
dict keys. A reply that carries the keeper's persist and parity status (`Status`) carries it flat,
beside its own fields.
"""

from __future__ import annotations

import dataclasses
import functools
from enum import Enum
from typing import Any, ClassVar, TypeVar

Json = dict[str, Any]
R = TypeVar("R", bound="Reply")


class Op(str, Enum):
    """Every operation a keeper serves on its socket; the server maps each to one handler."""

    HELLO = "hello"
    PROTECT = "protect"
    REACH = "reach"
    INVENTORY = "inventory"
    HOLDINGS = "holdings"
    READ = "read"
    UNPIN = "unpin"
    REGISTER = "register"
    ACQUIRE = "acquire"
    COMPLETE = "complete"
    ABORT = "abort"
    PERSIST = "persist"
    FINISH = "finish"
    PROGRESS = "progress"
    STATUS = "status"
    PREFETCH = "prefetch"
    FORGET = "forget"


class MalformedMessage(ValueError):
    """A message whose fields do not match its operation's dataclass."""


_SCALARS: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


@functools.cache
def _hints(cls: type) -> dict[str, str]:
    """Each field's declared type, as written (annotations are strings here)."""
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: str, *, name: str) -> Any:
    """`value` as the scalar type `hint` names (`int`, `int | None`, ...); containers pass as they are."""
    optional = hint.endswith(" | None")
    base = hint.removesuffix(" | None")
    if value is None:
        if optional or base == "Any":
            return None
        raise MalformedMessage(f"field {name!r} may not be null")
    scalar = _SCALARS.get(base)
    if scalar is None:
        return value
    if scalar is bool and not isinstance(value, bool) or scalar is not bool and isinstance(value, (list, dict)):
        raise MalformedMessage(f"field {name!r} must be {base}, got {type(value).__name__}")
    try:
        return scalar(value)
    except (TypeError, ValueError):
        raise MalformedMessage(f"field {name!r} must be {base}, got {value!r}") from None


class _Message:
    """Flat JSON in and out; a nested `Status` field travels flattened."""

    def to_json(self) -> Json:
        out: Json = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Status):
                out.update(value.to_json())
            elif value is not None or f.name != "status":
                out[f.name] = value
        return out

    @classmethod
    def _build(cls, data: Json, *, strict: bool) -> Any:
        hints = _hints(cls)
        values: Json = {}
        for name, hint in hints.items():
            if hint.startswith("Status"):
                values[name] = Status.from_json(data) if "copied" in data else None
            elif name in data:
                values[name] = _coerce(data[name], hint, name=name)
        if strict:
            unknown = set(data) - set(hints) - {"op"}
            if unknown:
                raise MalformedMessage(f"unknown field(s) {sorted(unknown)}")
        try:
            return cls(**values)
        except TypeError as e:  # a required field is missing
            raise MalformedMessage(str(e).split("__init__() ")[-1]) from None


class Request(_Message):
    """A request: its operation and the type of the reply it gets."""

    op: ClassVar[Op]
    reply: ClassVar[type[Reply]]

    def to_json(self) -> Json:
        return {"op": self.op.value, **super().to_json()}

    @classmethod
    def from_json(cls, data: Json) -> Any:
        """The request a frame holds; MalformedMessage names what is wrong with it."""
        try:
            return cls._build(data, strict=True)
        except MalformedMessage as e:
            raise MalformedMessage(f"malformed {cls.op.value!r} request: {e}") from None


class Reply(_Message):
    @classmethod
    def from_json(cls: type[R], data: Json) -> R:
        """Lenient: fields a newer keeper adds are ignored."""
        return cls._build(data, strict=False)


# ---- replies ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Status(Reply):
    """copied: newest step complete on every local rank; durable / committed: newest persisted;
    failed: newest step whose persist failed for good (and why); protected: newest step with parity."""

    copied: int = -1
    durable: int = -1
    committed: int = -1
    failed: int = -1
    failure: str = ""
    backlog: int = 0
    host_bytes: int = 0
    skipped: int = 0
    protected: int = -1
    parity_bytes: int = 0
    protect_cpu_s: float = 0.0


@dataclasses.dataclass
class Empty(Reply):
    pass


@dataclasses.dataclass
class HelloReply(Reply):
    keeper_id: str
    pid: int
    protocol: int
    node: str
    peer_address: str | None = None


@dataclasses.dataclass
class ProtectReply(Reply):
    describe: str


@dataclasses.dataclass
class ReachReply(Reply):
    node: str
    unreachable: dict[str, str] = dataclasses.field(default_factory=dict)  # node -> why it cannot be reached


@dataclasses.dataclass
class InventoryReply(Reply):
    """What this node holds for a recovery. `ranks`: rank -> its complete steps, layout digest and
    (unless compact) layout, JSON states and checksums; `superseded`: the same, of the earlier
    incarnation's snapshots kept until the running one protects a step; `reads`: what each new rank
    will read here; the rest is the parity service's account (plans, complete parity, metas)."""

    node: str = ""
    ranks: Json = dataclasses.field(default_factory=dict)
    superseded: Json = dataclasses.field(default_factory=dict)
    rebuilt: Json = dataclasses.field(default_factory=dict)
    prefetched: Json = dataclasses.field(default_factory=dict)
    reads: Json = dataclasses.field(default_factory=dict)
    address: str | None = None
    plans: list[Json] = dataclasses.field(default_factory=list)
    parity: Json = dataclasses.field(default_factory=dict)
    metas: Json = dataclasses.field(default_factory=dict)
    protected: Json = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class HoldingsReply(Reply):
    steps: list[int]
    digest: str | None = None


@dataclasses.dataclass
class ReadReply(Reply):
    """A held snapshot's segment, or (`prefetched`) the segments and spans of it prefetched here."""

    layout: Json
    tree: Any
    checksums: list[int] | None = None
    segment: str | None = None
    prefetched: list[Json] | None = None


@dataclasses.dataclass
class RegisterReply(Reply):
    segments: list[str]
    status: Status | None = None


@dataclasses.dataclass
class AcquireReply(Reply):
    """A slot to copy into, or none and why (`held`: the step is in already; `busy`)."""

    slot: int | None = None
    reason: str | None = None
    shares: Json | None = None  # where and how to scale the slot's parity shares
    status: Status | None = None


@dataclasses.dataclass
class PrefetchReply(Reply):
    prefetching: bool


# ---- requests ---------------------------------------------------------------------------------


def _request(op: Op, reply: type[Reply]) -> Any:
    def wrap(cls: type) -> type:
        cls.op, cls.reply = op, reply  # type: ignore[attr-defined]
        return dataclasses.dataclass(cls)

    return wrap


@_request(Op.HELLO, HelloReply)
class Hello(Request):
    pass


@_request(Op.PROTECT, ProtectReply)
class Protect(Request):
    """The running incarnation's erasure plan (None: no coding, a single node)."""

    plan: Json | None = None
    secret: str = ""


@_request(Op.REACH, ReachReply)
class Reach(Request):
    pass


@_request(Op.INVENTORY, InventoryReply)
class Inventory(Request):
    compact: bool = False
    ranks: list[int] | None = None
    step: int | None = None
    wait: bool = True  # for a rebuild or prefetch under way to finish


@_request(Op.HOLDINGS, HoldingsReply)
class Holdings(Request):
    rank: int


@_request(Op.READ, ReadReply)
class Read(Request):
    rank: int
    step: int


@_request(Op.UNPIN, Empty)
class Unpin(Request):
    rank: int
    step: int


@_request(Op.REGISTER, RegisterReply)
class Register(Request):
    rank: int
    local_world_size: int
    world_size: int
    token: str
    layout: Json
    store: Json | None = None
    host_memory_bytes: int = 0
    resumed_from: int = 0
    launcher: int | None = None
    lease_s: float | None = None
    pid: int | None = None
    hang_timeout_s: float | None = None
    peer_timeout_s: float | None = None
    supervisor: int | None = None  # the warm-restart supervisor that forked `pid`, when there is one


@_request(Op.ACQUIRE, AcquireReply)
class Acquire(Request):
    rank: int
    step: int
    required: bool = False  # wait for a slot (a step to persist) rather than skip


@_request(Op.COMPLETE, Status)
class Complete(Request):
    rank: int
    slot: int
    step: int
    tree: Any = None
    persist: bool = False
    scaled: str = ""  # the share recipe the worker scaled with ("" when it did not)
    checksums: list[int] | None = None


@_request(Op.ABORT, Empty)
class Abort(Request):
    rank: int
    slot: int


@_request(Op.PERSIST, Status)
class Persist(Request):
    """Persist a held step although it is not a multiple of checkpoint.every (the final step)."""

    rank: int
    step: int


@_request(Op.FINISH, Status)
class Finish(Request):
    rank: int


@_request(Op.PROGRESS, Empty)
class Progress(Request):
    rank: int
    step: int


@_request(Op.STATUS, Status)
class StatusRequest(Request):
    rank: int | None = None


@_request(Op.PREFETCH, PrefetchReply)
class Prefetch(Request):
    rank: int
    topology: dict[str, int]


@_request(Op.FORGET, Empty)
class Forget(Request):
    """Drop every snapshot of this rank: its machine's memory is lost (a simulated failure)."""

    rank: int


REQUESTS: dict[Op, type[Request]] = {cls.op: cls for cls in Request.__subclasses__()}


def parse(data: Json) -> Request:
    """The typed request a decoded frame holds; MalformedMessage if it holds none."""
    try:
        op = Op(data.get("op"))
    except ValueError:
        raise MalformedMessage(
            f"unknown request {data.get('op')!r}: the worker and keeper versions differ; restart the keeper"
        ) from None
    return REQUESTS[op].from_json(data)


if set(REQUESTS) != set(Op):  # checked at import: every operation has its request type
    raise RuntimeError(f"keeper operations without a request type: {sorted(set(Op) - set(REQUESTS))}")
