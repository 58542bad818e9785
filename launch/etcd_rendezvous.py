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
a round of its own and is never admitted. Here each agent keeps a key of its own in etcd, refreshed
every REFRESH_S and expiring `alive_ttl` seconds (a --rdzv-conf key, default 1) after its last refresh,
whether its agent died or its machine; every state this backend reads has the heartbeats of the
nodes whose key lives set to now, and of those whose key is gone set to long ago, so torch's own
sanitizing removes exactly the dead. A node judges others dead only while its own key has been kept
for a while: after etcd lost its leader every key may have lapsed at once.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from datetime import datetime, timezone

import etcd
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend, create_backend

log = logging.getLogger(__name__)
RETRY_S = 60.0
PAUSE_S = 0.2
ALIVE_TTL_S = 1  # etcd's leader expires keys on a 0.5 s tick: a dead node's key lapses 1 to 1.5 s after it died
REFRESH_S = 0.2
LONG_AGO = datetime.min.replace(tzinfo=timezone.utc)


class RetryingEtcdBackend(EtcdRendezvousBackend):
    def __init__(self, inner: EtcdRendezvousBackend, retry_s: float, alive_ttl_s: int = ALIVE_TTL_S) -> None:
        self.__dict__.update(inner.__dict__)  # torch's backend: its client, key and ttl
        self.retry_s = retry_s
        self.alive_ttl_s = alive_ttl_s
        self._node: str | None = None  # this node, once its key is kept (`keep_alive`)
        self._kept_since: float | None = None  # since when this node's own key has been refreshed without a miss

    @property
    def name(self) -> str:
        return "resurgo-etcd"

    @property
    def alive_dir(self) -> str:
        """Beside the rendezvous state's key: one key per live node under it."""
        return f"{self._key}-alive"

    def get_state(self):
        return self._judged(self._retried(super().get_state))

    def set_state(self, state, token=None):
        return self._judged(self._retried(lambda: super(RetryingEtcdBackend, self).set_state(state, token)))

    def keep_alive(self, node: str) -> None:
        """Keep `node`'s key alive from a daemon thread for as long as this process lives; the first
        refresh is done before returning, so the key exists before the node joins a round."""
        key = f"{self.alive_dir}/{node}"
        self._refresh(key)
        self._node = node
        threading.Thread(target=self._refresh_forever, args=(key,), name="resurgo-rdzv-alive", daemon=True).start()

    def _refresh_forever(self, key: str) -> None:
        while True:
            time.sleep(REFRESH_S)
            self._refresh(key)

    def _refresh(self, key: str) -> None:
        try:
            self._client.write(key, "alive", ttl=self.alive_ttl_s)
        except Exception as e:  # noqa: BLE001 -- etcd electing a leader, or unreachable: the next refresh tries again
            if self._kept_since is not None:
                log.warning("could not refresh this node's key in etcd (%s): trying again", e)
            self._kept_since = None
        else:
            if self._kept_since is None:
                self._kept_since = time.monotonic()

    def alive(self) -> set[str] | None:
        """The nodes whose key lives; None when etcd does not say."""
        try:
            found = self._client.read(self.alive_dir, recursive=True)
        except etcd.EtcdKeyNotFound:
            return set()
        except Exception:  # noqa: BLE001 -- unreachable: the state is then passed on as read
            return None
        prefix = found.key.rstrip("/") + "/"
        return {leaf.key[len(prefix) :] for leaf in found.leaves if leaf.key.startswith(prefix)}

    def _judged(self, result):
        """`result` (a state read or written, with its token) with every node's heartbeat set from
        its key: now where the key lives; long ago where it is gone, if this node's own key has been
        kept long enough for the others' to have been refreshed too and etcd answered. Where that
        cannot be told, every node is taken as alive: a dead one is then dropped later, never a live one."""
        if result is None or self._node is None:
            return result
        alive, kept_since = self.alive(), self._kept_since
        steady = alive is not None and kept_since is not None
        steady = steady and time.monotonic() - kept_since > self.alive_ttl_s  # the others' refreshers caught up too
        state = pickle.loads(result[0])  # torch's own rendezvous state, which torch pickles
        now = datetime.now(timezone.utc)
        for node in list(state.last_heartbeats):
            state.last_heartbeats[node] = LONG_AGO if steady and repr(node) not in alive else now
        return (pickle.dumps(state), *result[1:])

    def _retried(self, call):
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                return call()
            except RendezvousConnectionError as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("etcd did not answer (%s: %s): trying again", e, e.__cause__)
                time.sleep(PAUSE_S)


def create_rendezvous_handler(params: RendezvousParameters):
    backend, store = create_backend(params)
    retrying = RetryingEtcdBackend(
        backend, float(params.get("retry_s", RETRY_S)), params.get_as_int("alive_ttl", ALIVE_TTL_S) or ALIVE_TTL_S
    )
    handler = create_handler(store, retrying, params)
    retrying.keep_alive(repr(handler._this_node))  # torch's name for this node: address, agent pid, local id
    return handler


def handler():
    """The `torchrun.handlers` entry point: torchrun calls it for the creator it registers."""
    return create_rendezvous_handler
