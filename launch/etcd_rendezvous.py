"""torchrun's etcd-v2 rendezvous, made to ride out the loss of etcd's leader: `--rdzv-backend resurgo-etcd`.

When the member leading the etcd cluster dies (its node did), a write that was in flight to it is
lost, and etcd answers "request timed out" a few seconds later, after a new leader was elected.
torch's etcd-v2 backend turns that one answer into a RendezvousConnectionError, which ends the agent:
the loss of the leader's node would take every surviving node's agent with it. This backend is
torch's own, with its reads and writes retried for `retry_s` (a --rdzv-conf key, default 60 s) while
etcd has no leader or does not answer. A write retried after its first attempt did land fails its
compare-and-set, and the backend then returns the state as it is, which includes that write: the
rendezvous handler reads it as any other concurrent change. torchrun finds the backend through
the `torchrun.handlers` entry point this package installs.

Which nodes are alive is etcd's to say, not the nodes' own heartbeats in the rendezvous state. torch
drops a node whose last heartbeat there is older than `keep_alive_interval x keep_alive_max_attempt`,
and a node that finds itself dropped from its own copy of the state never sends one again. Set short
enough to notice a lost node in about a second, a node that has just joined a round (its heartbeat
a second or two old already) drops itself, and a replacement then finds no participant left, starts
a round of its own and is never admitted. Here each agent rewrites a key of its own in etcd every
REFRESH_S and reads everyone's: a node whose key did not change over the last STILL_REFRESHES of this
node's own successful refreshes (or has no key) is dead. Counted in this node's own refreshes, not in
seconds, so that while etcd elects a leader, when nobody's refresh lands, nobody is judged dead. Every
state this backend reads has the heartbeats of the live set to now and of the dead to long ago, so
torch's own sanitizing removes exactly the dead. The keys expire after KEY_TTL_S, for tidiness only.

Two --rdzv-conf keys take fractions of a second here, where torch takes whole seconds: `read_timeout`
(a request to etcd given up and sent again; one lost with the leader waits this long) and
`last_call_timeout` (how long a round that has its minimum waits for more nodes).
"""

from __future__ import annotations

import logging
import math
import pickle
import threading
import time
from datetime import datetime, timedelta, timezone

import etcd
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters, dynamic_rendezvous
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend, create_backend
from torch.distributed.elastic.rendezvous.etcd_store import EtcdStore

log = logging.getLogger(__name__)
RETRY_S = 60.0
PAUSE_S = 0.2
REFRESH_S = 0.125
STILL_REFRESHES = 4  # a node silent for this many of this node's own refreshes (0.5 s) is dead
KEY_TTL_S = 30
POLL_S = 0.1  # how often a waiting node reads the rendezvous state (torch: once a second)
WATCH_S = 0.5  # longest a wait for keys in the store watches before it reads them again
LONG_AGO = datetime.min.replace(tzinfo=timezone.utc)


class RetryingEtcdBackend(EtcdRendezvousBackend):
    def __init__(self, inner: EtcdRendezvousBackend, retry_s: float) -> None:
        self.__dict__.update(inner.__dict__)  # torch's backend: its client, key and ttl
        self.retry_s = retry_s
        self._node: str | None = None  # this node, once its key is kept (`keep_alive`)
        self._refreshes = 0  # this node's successful refreshes so far
        self._seen: dict[str, tuple[int, int]] = {}  # node -> (its key's etcd index, self._refreshes when first seen)
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "resurgo-etcd"

    @property
    def alive_dir(self) -> str:
        """Beside the rendezvous state's key: one key per node under it, rewritten while it lives."""
        return f"{self._key}-alive"

    def get_state(self):
        return self._judged(self._retried(super().get_state))

    def set_state(self, state, token=None):
        return self._judged(self._retried(lambda: super(RetryingEtcdBackend, self).set_state(state, token)))

    def keep_alive(self, node: str) -> None:
        """Keep `node`'s key alive from a daemon thread for as long as this process lives; the first
        refresh is done before returning, so the key exists before the node joins a round."""
        self._node = node
        self.refresh()
        threading.Thread(target=self._refresh_forever, name="resurgo-rdzv-alive", daemon=True).start()

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(REFRESH_S)
            self.refresh()

    def refresh(self) -> None:
        """Rewrite this node's key, then note whose keys changed since (one refresh of this node's)."""
        try:
            # A request lost with etcd's leader would hang for the client's read timeout: given up sooner.
            self._client.write(f"{self.alive_dir}/{self._node}", "alive", ttl=KEY_TTL_S, timeout=2 * REFRESH_S)
            indices = self._indices(timeout=2 * REFRESH_S)
        except Exception as e:  # noqa: BLE001 -- etcd electing a leader, or unreachable: the next refresh tries again
            log.debug("could not refresh this node's key in etcd (%s): trying again", e)
            return
        with self._lock:
            self._refreshes += 1
            self._note(indices)

    def _indices(self, **timeout: float) -> dict[str, int]:
        """Every node's key and the etcd index it was last written at."""
        try:
            found = self._client.read(self.alive_dir, recursive=True, **timeout)
        except etcd.EtcdKeyNotFound:
            return {}
        prefix = found.key.rstrip("/") + "/"
        return {leaf.key[len(prefix) :]: leaf.modifiedIndex for leaf in found.leaves if leaf.key.startswith(prefix)}

    def _note(self, indices: dict[str, int]) -> None:
        for node, index in indices.items():
            if self._seen.get(node, (None, 0))[0] != index:
                self._seen[node] = (index, self._refreshes)

    def dead(self, nodes: list[str]) -> set[str] | None:
        """Those of `nodes` whose key did not change over this node's last STILL_REFRESHES refreshes,
        or that have none; None while that cannot be told (etcd does not answer)."""
        try:
            indices = self._indices()  # read now: a node that wrote its key since the last refresh joins as alive
        except Exception:  # noqa: BLE001 -- unreachable: nobody is judged
            return None
        with self._lock:
            self._note(indices)
            if self._refreshes < STILL_REFRESHES:
                return set()  # too soon after this node's start to say of any other
            return {n for n in nodes if n not in indices or self._refreshes - self._seen[n][1] >= STILL_REFRESHES}

    def _judged(self, result):
        """`result` (a state read or written, with its token) with every node's heartbeat set from its
        key: long ago for the dead, now for the others. Where that cannot be told, every node is taken
        as alive: a dead one is then dropped later, never a live one."""
        if result is None or self._node is None:
            return result
        state = pickle.loads(result[0])  # torch's own rendezvous state, which torch pickles
        dead = self.dead([repr(node) for node in state.last_heartbeats]) or set()
        now = datetime.now(timezone.utc)
        for node in list(state.last_heartbeats):
            state.last_heartbeats[node] = LONG_AGO if repr(node) in dead else now
        return (pickle.dumps(state), *result[1:])

    def _retried(self, call):
        return _retried(call, retry_s=self.retry_s, errors=(RendezvousConnectionError,))


class PromptEtcdStore(EtcdStore):
    """torch's store in etcd, through which the agents of a round learn rank 0's address, with two
    holes closed. A wait for keys whose folder does not exist yet watches from "now", so keys written
    between its read and its watch are missed and the wait lasts its whole timeout (a node's agent was
    seen waiting 300 s for MASTER_ADDR, and the round's other ranks failed without it): here a watch
    lasts at most WATCH_S before the keys are read again. And a request made while etcd elects a
    leader fails: retried, as the rendezvous state's are."""

    def __init__(self, client, prefix: str, retry_s: float) -> None:
        super().__init__(client, prefix)
        self.retry_s = retry_s

    def set(self, key, value):
        _retried(lambda: super(PromptEtcdStore, self).set(key, value), retry_s=self.retry_s, errors=_UNANSWERED)

    def _try_wait_get(self, b64_keys, override_timeout=None):
        timeout = self.timeout if override_timeout is None else override_timeout
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            watch = timedelta(seconds=max(min(WATCH_S, deadline - time.monotonic()), 0.001))
            try:
                found = super()._try_wait_get(b64_keys, override_timeout=watch)
            except _UNANSWERED as e:
                log.warning("etcd did not answer (%s): trying again", e)
                found = None
                time.sleep(PAUSE_S)
            if found is not None or time.monotonic() >= deadline:
                return found


_UNANSWERED = (etcd.EtcdConnectionFailed,)  # the store's requests fail with python-etcd's own errors


def _retried(call, *, retry_s: float, errors: tuple[type[Exception], ...]):
    """`call()`, tried again for up to `retry_s` while it fails with one of `errors` (etcd unanswering)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return call()
        except errors as e:
            if time.monotonic() > deadline:
                raise
            log.warning("etcd did not answer (%s: %s): trying again", e, e.__cause__)
            time.sleep(PAUSE_S)


def create_rendezvous_handler(params: RendezvousParameters):
    # torch reads these two as whole seconds; here they may be fractions (`last_call_timeout=0.25`).
    read_timeout, last_call = (_fractional_seconds(params, key) for key in ("read_timeout", "last_call_timeout"))
    backend, store = create_backend(params)
    if read_timeout is not None:
        backend._client._read_timeout = read_timeout
    retry_s = float(params.get("retry_s", RETRY_S))
    store = PromptEtcdStore(backend._client, store.prefix, retry_s)
    retrying = RetryingEtcdBackend(backend, retry_s)
    handler = create_handler(store, retrying, params)
    if last_call is not None:
        handler._settings.timeout._set_timeouts(last_call=timedelta(seconds=last_call))
    retrying.keep_alive(repr(handler._this_node))  # torch's name for this node: address, agent pid, local id
    # torch reads the state of a rendezvous it waits on once a second, and serves reads from a copy
    # for a second: every step of a round (the lost node dropped, the survivors in, the last call
    # over, each node seeing it) waited up to that second. Polled more often here.
    handler._state_holder._cache_duration = POLL_S
    dynamic_rendezvous._delay = _polling_delay
    return handler


def _fractional_seconds(params: RendezvousParameters, key: str) -> float | None:
    """`key` of the --rdzv-conf in seconds, fractions allowed; torch is left a whole number to parse."""
    value = params.config.get(key)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"--rdzv-conf {key}={value}: not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"--rdzv-conf {key}={value}: must be positive")
    params.config[key] = str(math.ceil(seconds))
    return seconds


_torch_delay = dynamic_rendezvous._delay


def _polling_delay(seconds) -> None:
    """torch's pause between reads of the state it waits on (its one second), shortened to POLL_S."""
    _torch_delay(POLL_S if seconds == 1 else seconds)


def handler():
    """The `torchrun.handlers` entry point: torchrun calls it for the creator it registers."""
    return create_rendezvous_handler
