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
"""

from __future__ import annotations

import logging
import time

from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend, create_backend

log = logging.getLogger(__name__)
RETRY_S = 60.0
PAUSE_S = 0.2


class RetryingEtcdBackend(EtcdRendezvousBackend):
    def __init__(self, inner: EtcdRendezvousBackend, retry_s: float) -> None:
        self.__dict__.update(inner.__dict__)  # torch's backend: its client, key and ttl
        self.retry_s = retry_s

    @property
    def name(self) -> str:
        return "resurgo-etcd"

    def get_state(self):
        return self._retried(super().get_state)

    def set_state(self, state, token=None):
        return self._retried(lambda: super(RetryingEtcdBackend, self).set_state(state, token))

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
    retry_s = float(params.get("retry_s", RETRY_S))
    return create_handler(store, RetryingEtcdBackend(backend, retry_s), params)


def handler():
    """The `torchrun.handlers` entry point: torchrun calls it for the creator it registers."""
    return create_rendezvous_handler
