"""The keeper's erasure-coding side: parity for its node's snapshots, held by peers, and fetches for recovery.

When a step is complete on every local rank, the node's coded ranks' slots, end to end, form its
coded stream, cut into k segments (`NodeCoding`). For every stripe it feeds, each segment's share
of each parity buffer (`erasure.accumulate`) is added by the parity holder as the pieces arrive, so a
holder keeps one buffer per parity and never a copy of anybody's data. Before its shares, a node
sends every peer of its group its ranks' JSON state and slot layouts (the meta), which a rebuilt
rank needs as much as its bytes. A step is protected when every parity of the group is complete.

All of it runs on the keeper's own threads and its own TCP connections: the training never waits for
it; a step whose coding is still running when the next one completes is skipped (protection lag).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..state.slot_layout import SlotLayout
from .coding import ErasureSetup, NodeCoding, ShareRecipe, share_recipe, stream_read
from .parity_buffer import PIECE_BYTES, Pace, ParityBuffer
from .peer_serving import PeerServing
from .plan import ErasurePlan
from .wire import PeerClient, PeerError, PeerServer, background_priority

log = logging.getLogger(__name__)

KEEP_PLANS = 2  # the running incarnation's plan and the one it may be recovering from
PROTECT_WAIT_S = 120.0  # longest a group's leader waits for a step's parity before coding another
STALL_SAY_S = 10.0  # a step in coding this long is reported (the protection lag grows meanwhile)


SlotSource = Callable[[int, int], "np.ndarray | None"]  # (rank, step) -> the slot's bytes, None if not held


class ParityService(PeerServing):
    """One per keeper; `serve` starts its TCP server, `protect` takes a plan, `submit` codes a step."""

    def __init__(
        self,
        *,
        node: str,
        host: str,
        slot_source: SlotSource,
        on_protected: Callable[[], None],
        report: Callable[..., dict[str, Any]] | None = None,
        on_announced: Callable[[int], None] | None = None,
    ) -> None:
        """`report(compact=, ranks=, step=)`: this node's whole inventory (held slots too) for peers that
        ask (`report_fields`); default `inventory()`.
        `on_announced(step)`: the group's leader began coding `step`: submit it once it is held here."""
        self.node, self.slot_source, self.on_protected = node, slot_source, on_protected
        self.on_announced = on_announced or (lambda step: None)
        self.report = report or (lambda **_: self.inventory())
        self.plans: dict[str, tuple[ErasureSetup, ErasurePlan]] = {}
        self.current: str | None = None
        self.secret = ""  # the running incarnation's: what peers and workers must present
        self._parity: dict[tuple[str, int, int, int], ParityBuffer] = {}
        self._spare: list[np.ndarray] = []  # evicted parity buffers: a step reuses them, not fresh pages
        self._done: dict[tuple[str, int], set[tuple[int, int]]] = {}
        self._meta: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}  # (token, step) -> node -> meta
        self._layouts: dict[tuple[str, int], dict[str, Any]] = {}  # (token, rank) -> slot layout json
        self.protected: dict[str, int] = {}
        self._coded: dict[str, int] = {}  # token -> newest step whose shares this node sent
        self._thread_cpu_s = 0.0  # the coding and notice threads' CPU time
        self._pace = Pace()  # of the parity traffic sent, across steps (fault.erasure.max_mb_s)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a step protected, a new plan, or the coder stopping
        self._announced: dict[str, int] = {}  # token -> the step the group's leader codes now
        self._scaled: set[str] = set()  # incarnations whose workers' scaled shares were used
        self._coding = -1  # the step being coded (until the leader saw it protected): nothing else is taken meanwhile
        self._coding_since = 0.0  # when it was taken
        self._stall_said = -1  # the step in coding whose stall was reported
        self._coding_token: str | None = None
        self._stopping = False
        self._clients: dict[str, PeerClient] = {}
        self._sent: dict[tuple[str, str, int], str] = {}  # (token, peer, rank) -> layout digest the peer holds
        self._jobs: queue.Queue[tuple[str, int, dict, Callable[[], None], dict, dict] | None] = queue.Queue(maxsize=1)
        self._notices: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self.server = PeerServer(
            host=host,
            handler=self._handle,
            secrets=self._secrets,
            background=frozenset({"contribute", "meta", "parity_done"}),
        )
        self._threads = [
            threading.Thread(target=self._code_loop, name="resurgo-erasure", daemon=True),
            threading.Thread(target=self._notice_loop, name="resurgo-erasure-notice", daemon=True),
        ]

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> None:
        self.server.start()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        self._notices.put(None)
        try:
            self._jobs.put(None, timeout=5)
        except queue.Full:
            pass
        self.server.stop()
        for client in list(self._clients.values()):  # the sending threads may still add or drop one
            client.close()

    # ---- plans and status -----------------------------------------------------------------

    def protect(self, plan: ErasureSetup) -> ErasurePlan:
        """Adopt the running incarnation's plan (the previous one stays for a recovery reading it)."""
        erasure_plan = plan.erasure()
        with self._lock:
            self.plans[plan.token] = (plan, erasure_plan)
            self.current, self.secret = plan.token, plan.secret
            # Keep the newest earlier plan with a protected step: a recovery that failed midway and the
            # one after it both read that incarnation's memory.
            earlier = sorted(
                (t for t in self.plans if t != plan.token and t in self.protected),
                key=lambda t: self.plans[t][0].created,
            )[-(KEEP_PLANS - 1) :]
            for stale in [t for t in self.plans if t != plan.token and t not in earlier]:
                self._forget(stale)
            self._changed.notify_all()  # a leader waiting on the last incarnation's parity codes this one's
        # A step of the last incarnation may still be waiting on a node this one left out (a hung node
        # answers nothing until the request's timeout): it fails now, and the coder takes this one's.
        for node, client in list(self._clients.items()):
            if node not in plan.nodes:
                client.abort()
        return erasure_plan

    def pause(self, *, secret: str) -> None:
        """Code nothing until the next plan (one node left); earlier plans stay for a recovery,
        served to the workers that know the running incarnation's `secret`."""
        with self._lock:
            self.current, self.secret = None, secret
            self._changed.notify_all()

    def newest_plan(self) -> ErasureSetup | None:
        """The plan of the newest incarnation this keeper coded for."""
        with self._lock:
            plans = [p for p, _ in self.plans.values()]
        return max(plans, key=lambda p: p.created, default=None)

    def protected_step(self) -> int:
        with self._lock:
            return self.protected.get(self.current, -1) if self.current else -1

    def protected_of(self, token: str) -> int:
        """The newest step protected in incarnation `token`, -1 if none (or its plan is forgotten)."""
        with self._lock:
            return self.protected.get(token, -1)

    def coded_step(self) -> int:
        """The newest step of the running incarnation whose shares this node sent: it becomes the
        protected one as soon as the group's parity completes, so its slots must stay whole."""
        with self._lock:
            return self._coded.get(self.current, -1) if self.current else -1

    def share_recipe(self, rank: int, sizes: Mapping[int, int]) -> ShareRecipe | None:
        """`rank`'s recipe for the running incarnation, given every local rank's slot bytes; None when
        its workers do not scale shares (the plan's site is the host, or `rank` is not coded here)."""
        with self._lock:
            if self.current is None:
                return None
            plan, erasure_plan = self.plans[self.current]
        coded = erasure_plan.coded_on(self.node)
        if plan.site != "device" or plan.m < 2 or rank not in coded or any(r not in sizes for r in coded):
            return None
        return share_recipe(
            NodeCoding(plan.k, tuple((r, int(sizes[r])) for r in coded)), rank, m=plan.m, token=plan.token
        )

    def coding_step(self) -> int:
        """The step being coded now, -1 when none."""
        with self._lock:
            return self._coding

    def inventory(self) -> dict[str, Any]:
        """What this node can serve to a recovery: plans, complete parity, the metas it holds."""
        with self._lock:
            parity: dict[str, dict[str, list[list[int]]]] = {}
            for (token, step, stripe, p), buf in self._parity.items():
                k = self.plans[token][0].k if token in self.plans else 0
                if k and buf.complete(k):
                    parity.setdefault(token, {}).setdefault(str(step), []).append(
                        [stripe, p, *[buf.lengths[t] for t in range(k)]]
                    )
            metas: dict[str, dict[str, dict[str, Any]]] = {}
            for (token, step), by_node in self._meta.items():
                metas.setdefault(token, {})[str(step)] = {n: m["digests"] for n, m in by_node.items()}
            return {
                "node": self.node,
                "address": self.address,
                "plans": [p.to_json() for p, _ in self.plans.values()],
                "parity": parity,
                "metas": metas,
                "protected": dict(self.protected),
            }

    # ---- coding a step ----------------------------------------------------------------------

    def submit(
        self,
        step: int,
        ranks: dict[int, tuple[SlotLayout, np.ndarray, Any]],
        release: Callable[[], None],
        shares: Mapping[int, tuple[str, np.ndarray]] | None = None,
        sums: Mapping[int, list[int] | None] | None = None,
    ) -> bool:
        """Code `step` of the local ranks ({rank: (slot layout, slot bytes, tree)}) in the background;
        False (and nothing held) when this node does not code it now. `shares`: the ranks' scaled
        shares ({rank: (token of their recipe, bytes)}), sent as they are when every coded rank has
        them for this incarnation; else the holders scale. `sums`: the slots' checksums, which travel
        in the meta so that a rank rebuilt from parity is checked as a held one is.

        Every node of a group must code the same steps, or no parity completes: the group's first
        node (the leader) codes whenever it is free and a step is due, and waits until that step is
        protected before it takes another; the others code the step the leader announced (its meta
        comes first), as soon as they hold it."""
        with self._lock:
            token = self.current
            if self._coding >= 0:
                self._say_stall(token)
            if token is None or step % self.plans[token][0].every or self._coding >= 0:
                return False
            if any(r not in ranks for r in self.plans[token][1].coded_on(self.node)):
                return False  # the ranks of another incarnation than the plan's: its workers are registering now
            if not self._leads(token) and self._announced.get(token) != step:
                return False
            self._coding, self._coding_since, self._coding_token = step, time.monotonic(), token
        self._jobs.put((token, step, ranks, release, dict(shares or {}), dict(sums or {})))
        return True

    def _say_stall(self, token: str | None) -> None:
        """Once per step: the step in coding has held the coder for STALL_SAY_S (under the lock)."""
        waited = time.monotonic() - self._coding_since
        if waited > STALL_SAY_S and self._stall_said != self._coding:
            self._stall_said = self._coding
            log.warning(
                "step %d has been in coding for %.0f s (incarnation %s, now %s; this node %s): no newer step is "
                "protected meanwhile",
                self._coding,
                waited,
                self._coding_token,
                token,
                "leads its group" if token is not None and self._leads(token) else "follows its group's leader",
            )

    def _leads(self, token: str) -> bool:
        """Whether this node leads its group in incarnation `token` (False once its plan is forgotten:
        a new plan may replace it while the coder waits)."""
        if token not in self.plans:
            return False
        group = self.plans[token][1].group_of(self.node)
        return group is None or group.nodes[0] == self.node

    def _code_loop(self) -> None:
        background_priority()
        while (job := self._jobs.get()) is not None:
            token, step, ranks, release, shares, sums = job
            start = time.thread_time()
            coded = False
            try:
                self._code(token, step, ranks, shares, sums)
                coded = True
                with self._lock:
                    self._coded[token] = max(self._coded.get(token, -1), step)
            except PeerError as e:
                log.warning("step %d is not protected: %s", step, e)
            except Exception:
                log.exception("coding step %d failed", step)
            finally:
                release()
                self._add_cpu(time.thread_time() - start)
            with self._lock:
                if coded and self._leads(token):  # the others are still sending theirs: wait, not outrun them
                    if not self._changed.wait_for(
                        lambda: self.protected.get(token, -1) >= step or self._stopping or token != self.current,
                        timeout=PROTECT_WAIT_S,
                    ):
                        log.warning(
                            "step %d is not protected %.0f s after this node sent its shares: coding the next",
                            step,
                            PROTECT_WAIT_S,
                        )
                self._coding = -1
                announced = self._missed_announcement(token, step)
            if announced >= 0:
                self.on_announced(announced)

    def _missed_announcement(self, token: str, step: int) -> int:
        """The step this node's leader announced while `step` of incarnation `token` was being coded
        here, -1 if none (under the lock). The running incarnation may be another by now (a recovery
        adopted the next plan while a step of the last one was still being sent): its leader's
        announcement is then as new as any step of it this node sent."""
        current = self.current
        if current is None or self._leads(current):
            return -1
        announced = self._announced.get(current, -1)
        done = step if current == token else self._coded.get(current, -1)
        return announced if announced > done else -1

    def _add_cpu(self, seconds: float) -> None:
        with self._lock:
            self._thread_cpu_s += seconds

    def cpu_s(self) -> float:
        """CPU seconds (user + system) this keeper spent protecting: coding, sending, adding shares."""
        with self._lock:
            return self._thread_cpu_s + self.server.background_cpu_s

    def _code(
        self,
        token: str,
        step: int,
        ranks: dict[int, tuple[SlotLayout, np.ndarray, Any]],
        shares: Mapping[int, tuple[str, np.ndarray]],
        sums: Mapping[int, list[int] | None],
    ) -> None:
        plan, erasure_plan = self.plans[token]
        group = erasure_plan.group_of(self.node)
        if group is None:
            return
        coded = erasure_plan.coded_on(self.node)
        coding = NodeCoding(plan.k, tuple((r, int(ranks[r][1].size)) for r in coded))
        meta = {
            "node": self.node,
            "coded": [[r, n] for r, n in coding.sizes],
            "trees": {str(r): tree for r, (_, _, tree) in ranks.items()},
            "sums": {str(r): s for r, s in sums.items()},
            "digests": {str(r): layout.digest for r, (layout, _, _) in ranks.items()},
        }
        for node in group.nodes:
            # A layout changes only when the state does: each peer gets it once per incarnation.
            new = {
                r: layout for r, (layout, _, _) in ranks.items() if self._sent.get((token, node, r)) != layout.digest
            }
            layouts = {str(r): layout.to_json() for r, layout in new.items()}
            self._send(node, plan, "meta", token=token, step=step, meta={**meta, "layouts": layouts})
            self._sent.update({(token, node, r): layout.digest for r, layout in new.items()})
        rows = [[ranks[r][1] for r in coded]]  # row p: what goes to parity p (row 0 the data itself)
        if plan.site == "device" and all(shares.get(r, ("",))[0] == token for r in coded):
            rows += [[shares[r][1][(p - 1) * n : p * n] for r, n in coding.sizes] for p in range(1, plan.m)]
            if token not in self._scaled:
                self._scaled.add(token)
                log.info(
                    "from step %d the workers scale the shares of parity rows 1..%d: the holders only add them",
                    step,
                    plan.m - 1,
                )
        for index, stripe in enumerate(group.stripes):
            for t in (t for (n, t) in stripe.data if n == self.node):
                length = coding.length(t)
                for p, holder in enumerate(stripe.parity):
                    scaled = 0 < p < len(rows)
                    for offset in range(0, max(length, 1), PIECE_BYTES):
                        piece = stream_read(
                            rows[p if scaled else 0], t * coding.segment + offset, min(PIECE_BYTES, length - offset)
                        )
                        self._pace.wait(piece.size, bytes_per_s=plan.max_mb_s * 1e6)
                        self._send(
                            holder,
                            plan,
                            "contribute",
                            piece,
                            token=token,
                            step=step,
                            stripe=index,
                            index=t,
                            parity=p,
                            offset=offset,
                            length=length,
                            scaled=scaled,
                        )

    def _send(self, node: str, plan: ErasureSetup, op: str, payload: Any = None, **fields: Any) -> dict[str, Any]:
        if node == self.node:
            reply, _ = self._handle({"op": op, **fields}, memoryview(payload if payload is not None else b""))
            return reply
        client = self._clients.get(node)
        if client is None or client.address != plan.peers[node] or client.secret != plan.secret:
            client = self._clients[node] = PeerClient(plan.peers[node], secret=plan.secret)
        try:
            return client.request(op, payload, **fields)[0]
        except PeerError:
            self._clients.pop(node, None)
            client.close()
            self._sent = {key: d for key, d in self._sent.items() if key[1] != node}  # it may come back empty
            raise

    # ---- memory bounds ----------------------------------------------------------------------

    def _evict(self, token: str, step: int) -> None:
        """A newer step of `token` is protected: older parity of it, and all of other incarnations, go."""

        def stale(t: str, s: int) -> bool:
            return t != token or s < step

        # Spares: as many buffers as this step uses, for the next step to fill (segment sizes repeat);
        # a spare no segment of this step fits (an earlier incarnation's layout) would only crowd out
        # one that does, and every later step would then fill fresh pages.
        used = [b.data.size for k, b in self._parity.items() if k[:2] == (token, step)]
        keep, sizes = len(used), set(used)
        self._spare = [s for s in self._spare if s.size in sizes]
        for key in [k for k in self._parity if stale(k[0], k[1])]:
            self._drop_parity(key, keep=keep, sizes=sizes)
        for table in (self._done, self._meta):
            for key in [k for k in table if stale(*k)]:
                del table[key]
        for key in [k for k in self._layouts if k[0] != token]:
            del self._layouts[key]

    def _new_parity(self, length: int) -> ParityBuffer:
        """A parity buffer of `length` bytes: a spare one of that size, else new (its first shares fill it)."""
        for i, spare in enumerate(self._spare):
            if spare.size == length:
                return ParityBuffer(self._spare.pop(i))
        return ParityBuffer(np.empty(length, dtype=np.uint8))

    def _drop_parity(self, key: tuple[str, int, int, int], *, keep: int, sizes: set[int]) -> None:
        """Evict one parity buffer, kept as a spare while fewer than `keep` are and its size is in use."""
        buf = self._parity.pop(key)
        if len(self._spare) < keep and buf.data.size in sizes:
            self._spare.append(buf.data)

    def _forget(self, token: str) -> None:
        self.plans.pop(token, None)
        self.protected.pop(token, None)
        self._coded.pop(token, None)
        for table in (self._parity, self._done, self._meta, self._layouts):
            for key in [k for k in table if k[0] == token]:
                del table[key]

    def parity_bytes(self) -> int:
        """Host memory parity takes here: buffers held and spares."""
        with self._lock:
            return sum(b.data.size for b in self._parity.values()) + sum(s.size for s in self._spare)
