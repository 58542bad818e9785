"""How the parity service answers its peers over the wire: shares to add to a parity buffer, nodes'
metas, "parity complete" notices, and the fetches a recovery makes (slot bytes, parity, a node's
coded segment). A part of `ParityService`, mixed in; every request is one entry of `_peer_handlers`."""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .coding import ErasureSetup, NodeCoding, segment_read, stream_read
from .parity_buffer import ParityBuffer
from .plan import ErasurePlan
from .wire import PeerError, background_priority

log = logging.getLogger(__name__)


class PeerServing:
    """The peer-facing half of `ParityService` (service.py): the state it reads is the service's."""

    node: str
    secret: str
    current: str | None
    plans: dict[str, tuple[ErasureSetup, ErasurePlan]]
    protected: dict[str, int]
    report: Callable[..., dict[str, Any]]
    slot_source: Callable[[int, int], np.ndarray | None]
    on_protected: Callable[[], None]
    on_announced: Callable[[int], None]
    _lock: threading.Lock
    _changed: threading.Condition
    _notices: queue.Queue
    _parity: dict[tuple[str, int, int, int], ParityBuffer]
    _meta: dict[tuple[str, int], dict[str, Any]]
    _layouts: dict[tuple[str, int], Any]
    _done: dict[tuple[str, int], set[tuple[int, int]]]
    _announced: dict[str, int]
    _new_parity: Callable[[int], ParityBuffer]
    _evict: Callable[[str, int], None]
    _add_cpu: Callable[[float], None]
    _send: Callable[..., dict[str, Any]]

    def _secrets(self) -> set[str]:
        """The running incarnation's secret and those of the earlier ones kept: a survivor still
        prefetching an earlier incarnation's memory reads on after its peers adopted the next plan."""
        with self._lock:
            return {self.secret, *(p.secret for p, _ in self.plans.values())}

    def _handle(self, header: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], Any]:
        """The reply header and payload to one peer request; ValueError for an unknown one."""
        handler = self._peer_handlers.get(str(header.get("op")))
        if handler is None:
            raise ValueError(f"unknown peer request {header.get('op')!r}")
        return handler(header, payload)

    @functools.cached_property
    def _peer_handlers(self) -> dict[str, Callable[[dict[str, Any], memoryview], tuple[dict[str, Any], Any]]]:
        """One handler per peer operation: (header, payload) -> (reply header, reply payload)."""
        return {
            "contribute": lambda h, payload: (self._contribute(h, payload), None),
            "meta": lambda h, _: (self._store_meta(h), None),
            "parity_done": lambda h, _: (
                self._parity_done(str(h["token"]), int(h["step"]), int(h["stripe"]), int(h["parity"])),
                None,
            ),
            "fetch": lambda h, _: ({}, self._fetch(h)),
            "inventory": lambda h, _: ({"inventory": self.report(**report_fields(h))}, None),
            "meta_of": lambda h, _: ({"meta": self.meta_of(str(h["token"]), int(h["step"]), str(h["node"]))}, None),
        }

    def _contribute(self, h: dict[str, Any], payload: memoryview) -> dict[str, Any]:
        token, step, stripe, p, t = str(h["token"]), int(h["step"]), int(h["stripe"]), int(h["parity"]), int(h["index"])
        offset, length = int(h["offset"]), int(h["length"])
        with self._lock:
            plan, _ = self.plans[token]
            key = (token, step, stripe, p)
            buf = self._parity.get(key)
            if buf is None:
                buf = self._parity[key] = self._new_parity(length)
        piece = np.frombuffer(payload, dtype=np.uint8)
        with buf.lock:  # outside the keeper's lock: shares for other buffers are added meanwhile
            buf.grow(length)
            # A scaled share is added as parity 0's are, with coefficient 1.
            buf.add(offset, piece, k=plan.k, m=plan.m, parity=0 if h.get("scaled") else p, index=t)
            buf.lengths[t] = length
            buf.received[t] = buf.received.get(t, 0) + piece.size
            complete = buf.complete(plan.k)
        if complete:
            group = self.plans[token][1].group_of(self.node)
            for node in group.nodes if group else ():
                self._notices.put(
                    (node, {"op": "parity_done", "token": token, "step": step, "stripe": stripe, "parity": p})
                )
        return {}

    def _store_meta(self, h: dict[str, Any]) -> dict[str, Any]:
        meta, token, step = dict(h["meta"]), str(h["token"]), int(h["step"])
        with self._lock:
            for rank, layout in meta.pop("layouts", {}).items():
                self._layouts[(token, int(rank))] = layout
            self._meta.setdefault((token, step), {})[str(meta["node"])] = meta
            plan = self.plans.get(token)
            group = plan[1].group_of(self.node) if plan else None
            announced = group is not None and meta["node"] == group.nodes[0] != self.node and token == self.current
            if announced:
                self._announced[token] = max(self._announced.get(token, -1), step)
        if announced:
            self.on_announced(step)
        return {}

    def _parity_done(self, token: str, step: int, stripe: int, p: int) -> dict[str, Any]:
        with self._lock:
            if token not in self.plans:
                return {}
            plan, erasure_plan = self.plans[token]
            group = erasure_plan.group_of(self.node)
            done = self._done.setdefault((token, step), set())
            done.add((stripe, p))
            newly = (
                group is not None and len(done) == len(group.stripes) * plan.m and step > self.protected.get(token, -1)
            )
            if newly:
                self.protected[token] = step
                self._evict(token, step)
                self._changed.notify_all()
        if newly:
            self.on_protected()
        return {}

    def _notice_loop(self) -> None:
        background_priority()
        while (notice := self._notices.get()) is not None:
            start = time.thread_time()
            node, message = notice
            with self._lock:
                entry = self.plans.get(message["token"])
            if entry is None:
                continue
            try:
                self._send(node, entry[0], message.pop("op"), **message)
            except PeerError as e:
                log.info("parity notice to %s not delivered: %s", node, e)
            self._add_cpu(time.thread_time() - start)

    def _fetch(self, h: dict[str, Any]) -> np.ndarray:
        kind, step, offset, nbytes = str(h["kind"]), int(h["step"]), int(h["offset"]), int(h["nbytes"])
        if kind == "slot":
            data = self.slot_source(int(h["rank"]), step)
            if data is None:
                raise LookupError(f"rank {h['rank']}'s snapshot of step {step} is not held on {self.node}")
            return stream_read([data], offset, nbytes)
        token = str(h["token"])
        if kind == "parity":
            with self._lock:
                buf = self._parity.get((token, step, int(h["stripe"]), int(h["parity"])))
            if buf is None:
                raise LookupError(f"no parity {h['stripe']}/{h['parity']} of step {step} on {self.node}")
            return stream_read([buf.data], offset, nbytes)
        if kind == "segment":
            with self._lock:
                plan, erasure_plan = self.plans[token]
            coded = erasure_plan.coded_on(self.node)
            parts = [self.slot_source(r, step) for r in coded]
            if any(p is None for p in parts):
                raise LookupError(f"{self.node} no longer holds every coded rank of step {step}")
            coding = NodeCoding(plan.k, tuple((r, int(p.size)) for r, p in zip(coded, parts)))
            return segment_read(coding, parts, int(h["index"]), offset, nbytes)
        raise ValueError(f"unknown fetch kind {kind!r}")

    def meta_of(self, token: str, step: int, node: str) -> dict[str, Any] | None:
        """A node's meta of `step` (its ranks' JSON state and slot layouts), None if not held here."""
        with self._lock:
            meta = self._meta.get((token, step), {}).get(node)
            if meta is None:
                return None
            ranks = [int(r) for r in meta["trees"]]
            return {**meta, "layouts": {str(r): self._layouts.get((token, r)) for r in ranks}}


def report_fields(msg: dict[str, Any]) -> dict[str, Any]:
    """The `inventory` request's options: `compact`, and the `ranks` and `step` to describe."""
    fields: dict[str, Any] = {"compact": bool(msg.get("compact", False))}
    if msg.get("ranks") is not None:
        fields["ranks"] = [int(r) for r in msg["ranks"]]
    if msg.get("step") is not None:
        fields["step"] = int(msg["step"])
    return fields
