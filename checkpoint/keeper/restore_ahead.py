"""What a keeper does for a restore before the restarted workers ask for it.

When a worker dies with a peer node, the keeper decodes that node's ranks from the survivors'
memory (rebuild.py) while torchrun restarts the job. Once a restarted worker tells it its new rank
and topology (op `prefetch`), it fetches what that rank's restore would read from other nodes
(prefetch.py) while the model is built. Both leave whole copies in this keeper's shared memory, which
the restore then reads as held: only the copy into the workers' tensors remains on its path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..erasure.peer_plan import choose
from ..erasure.peer_read import PeerReader
from ..erasure.service import ParityService
from ..state.slot_layout import SlotLayout
from . import messages as m
from . import prefetch, rebuild, shm
from .slots import COMPLETE, RankSlots, Slot, free
from .watch import HangWatch

log = logging.getLogger(__name__)

REBUILD_WAIT_S = 120.0  # longest an inventory waits for a rebuild of lost ranks to finish
REBUILT_SLOT = -1  # the segment name's slot index of a lost rank rebuilt here
PREFETCHED_SLOT = -2  # and of the first piece of an old rank prefetched here (the next ones count down)


@dataclass
class _Prefetched:
    """Spans of one old rank's slot of `step` prefetched here for a restore (prefetch.py): its description and pieces."""

    step: int
    layout: SlotLayout
    tree: Any
    checksums: list[int] | None
    pieces: list[tuple[prefetch.Prefetched, Slot]] = field(default_factory=list)
    seconds: float = 0.0

    def covered(self) -> list[prefetch.Span]:
        return prefetch.merge([(a, b) for prefetched, _ in self.pieces for a, b, _ in prefetched.spans])


class RestoreAhead:
    """The keeper's inventory, rebuilds and prefetches, mixed into `Keeper`: they share its lock
    (`_cond`), its parity service, ranks and peer watch, and use its `_holding`, `_name` and `_slot_bytes`."""

    _cond: threading.Condition
    parity: ParityService | None
    watch: HangWatch
    node: str
    ranks: dict[int, RankSlots]
    superseded: dict[int, RankSlots]

    def _init_ahead(self) -> None:
        self.rebuilt: dict[int, RankSlots] = {}  # lost nodes' ranks decoded here (rebuild.py), apart from ours
        self._rebuild_s: dict[int, float] = {}
        self._rebuilding = False
        self.prefetched: dict[int, _Prefetched] = {}  # other nodes' old ranks, the spans this node's restore reads
        self.reads: dict[int, dict[str, Any]] = {}  # new rank -> the step and old ranks its restore reads
        self._prefetch_requests: list[tuple[int, dict[str, int]]] = []
        self._prefetching = False

    def _prefetched(self, rank: int, step: int) -> _Prefetched | None:
        """The spans prefetched here of an old rank's step that this keeper does not hold whole."""
        if self._holding(rank, step) is not None:
            return None
        prefetched = self.prefetched.get(rank)
        return prefetched if prefetched is not None and prefetched.pieces and prefetched.step == step else None

    def _op_prefetch(self, req: m.Prefetch, conn: Any) -> m.PrefetchReply:
        """A restarted worker's new rank and topology: fetch what its restore will read from peers now."""
        if self.parity is None or self.parity.newest_plan() is None:
            return m.PrefetchReply(False)
        self._prefetch_requests.append((req.rank, {str(a): int(n) for a, n in req.topology.items()}))
        if not self._prefetching:
            self._prefetching = True
            threading.Thread(target=self._prefetch_loop, name="resurgo-keeper-prefetch", daemon=True).start()
        return m.PrefetchReply(True)

    def _op_inventory(self, req: m.Inventory, conn: Any) -> m.InventoryReply:
        """What this node holds for a recovery, once a rebuild or prefetch under way has finished
        (unless `wait` is false: a worker asking only for the plans)."""
        deadline = time.monotonic() + (REBUILD_WAIT_S if req.wait else 0.0)
        while (self._rebuilding or self._prefetching) and time.monotonic() < deadline:
            self._cond.wait(timeout=1.0)
        return m.InventoryReply.from_json(self._inventory(compact=req.compact, ranks=req.ranks, step=req.step))

    def _inventory(
        self, *, compact: bool = False, ranks: list[int] | None = None, step: int | None = None
    ) -> dict[str, Any]:
        """(Also what a peer keeper's recovery is told: the same document over the peer wire.) Every held rank's complete steps and layout digest (rebuilt ones too), plans, parity; unless
        `compact`, also each rank's layout and JSON states (only of `ranks`, and of `step`, when given).
        A restore agrees on a step from compact inventories, then asks only for the ranks it reads."""
        with self._cond:
            held = {**self.rebuilt, **self.ranks}  # a rank registered here is served from its own slots
            ranks_json = _describe(held, compact=compact, ranks=ranks, step=step)
            superseded = _describe(self.superseded, compact=compact, ranks=ranks, step=step)
            rebuilt = {str(r): round(self._rebuild_s[r], 3) for r in self.rebuilt if r not in self.ranks}
            prefetched = (
                {
                    "mb": sum(s.nbytes for h in self.prefetched.values() for s, _ in h.pieces) / 1e6,
                    "seconds": sum(h.seconds for h in self.prefetched.values()),
                }
                if self.prefetched
                else {}
            )
            reads = {str(r): dict(v) for r, v in self.reads.items()}
        return {
            "ranks": ranks_json,
            "superseded": superseded,
            "rebuilt": rebuilt,
            "prefetched": prefetched,
            "reads": reads,
            **(self.parity.inventory() if self.parity else {"node": self.node}),
        }

    # ---- rebuilding lost ranks (called with the lock held) ----------------------------------

    def _start_rebuild(self) -> None:
        """A worker died: if a peer node died with it, rebuild its ranks here before the restart asks."""
        if self._rebuilding or self.parity is None or self.parity.newest_plan() is None:
            return
        self._rebuilding = True
        threading.Thread(target=self._rebuild, name="resurgo-keeper-rebuild", daemon=True).start()

    def _survivors(self) -> Any:
        """What the reachable keepers of the newest plan hold (this one's too), None if none can say."""
        plan = self.parity.newest_plan() if self.parity is not None else None
        # A peer hung with its sockets open would hold every request to it until its timeout.
        silent = self.watch.silent(rebuild.PROBE_TIMEOUT_S)
        return rebuild.probe(plan, node=self.node, own=self._inventory(), skip=silent) if plan else None

    @contextmanager
    def _pinned(self, step: int) -> Iterator[None]:
        """This node's slots of `step`, of every kind held, kept from reuse or release while a background reader decodes from them."""
        with self._cond:
            pinned = [s for kind in self._holdings() for h in kind.values() if (s := h.find(step)) is not None]
            for slot in pinned:
                slot.pins += 1
        try:
            yield
        finally:
            with self._cond:
                for slot in pinned:
                    slot.pins -= 1

    def _rebuild(self) -> None:
        try:
            inventories = self._survivors()
            chosen, ranks = rebuild.plan_rebuild(inventories, node=self.node) if inventories else (None, [])
            if chosen is not None and ranks:
                with self._pinned(chosen.step):
                    for rank in ranks:
                        self._rebuild_rank(chosen, inventories, rank)
        except Exception:
            log.exception("rebuilding lost ranks ahead of the restart failed: the recovery decodes them itself")
        finally:
            with self._cond:
                self._rebuilding = False
                self._cond.notify_all()

    def _drop_rebuilt(self, rank: int) -> None:
        free(self.rebuilt.pop(rank).slots)
        self._rebuild_s.pop(rank, None)

    def _rebuild_rank(self, chosen: Any, inventories: Any, rank: int) -> None:
        with self._cond:
            if rank in self.rebuilt:
                self._drop_rebuilt(rank)
            allocate = _Allocation(self._name(rank, REBUILT_SLOT))
        with allocate:
            done, _ = rebuild.rebuild_rank(
                chosen, inventories, rank=rank, node=self.node, local=self._slot_bytes, allocate=allocate
            )
        slot = Slot(
            REBUILT_SLOT, allocate.segment, step=done.step, status=COMPLETE, tree=done.tree, checksums=done.sums
        )
        with self._cond:
            self.rebuilt[rank] = RankSlots(rank, done.layout, done.token, slots=[slot])
            self._rebuild_s[rank] = done.seconds
        log.info(
            "rebuilt lost rank %d's snapshot of step %d (%.1f MB) from peers' memory in %.2f s",
            rank,
            done.step,
            done.layout.nbytes / 1e6,
            done.seconds,
        )

    # ---- prefetching what a restore will read (prefetch.py) ------------------------------------------

    def _prefetch_loop(self) -> None:
        while True:
            with self._cond:
                while self._rebuilding:  # a rebuilt rank is held whole: nothing of it to prefetch
                    self._cond.wait(timeout=1.0)
                requests, self._prefetch_requests = self._prefetch_requests, []
                if not requests:
                    self._prefetching = False
                    self._cond.notify_all()
                    return
            try:
                self._prefetch(requests)
            except Exception:
                log.exception("prefetching for the restore failed: the restore reads from peers itself")

    def _prefetch(self, requests: list[tuple[int, dict[str, int]]]) -> None:
        inventories = self._survivors()
        chosen, _ = choose(list(inventories.values()), current="") if inventories else (None, "")
        if chosen is None:
            return
        by_topology: dict[tuple[tuple[str, int], ...], list[int]] = {}
        for rank, topology in requests:
            by_topology.setdefault(tuple(topology.items()), []).append(rank)
        reader = PeerReader(chosen, inventories, secret=chosen.plan.secret, node=self.node, local=self._slot_bytes)
        held = lambda r: self._slot_bytes(r, chosen.step) is not None  # noqa: E731
        try:
            with self._pinned(chosen.step):
                for topology, ranks in by_topology.items():
                    reads = prefetch.restore_reads(reader, topology=dict(topology), ranks=ranks)
                    with self._cond:
                        self.reads.update(
                            {r: {"step": chosen.step, "ranks": sorted(by_old)} for r, by_old in reads.items()}
                        )
                    for old, spans in prefetch.prefetch_spans(reads, held=held).items():
                        self._prefetch_spans(reader, old, spans)
        finally:
            reader.close()

    def _prefetch_spans(self, reader: PeerReader, rank: int, spans: list[prefetch.Span]) -> None:
        step, layout, tree = reader.chosen.step, reader.layout(rank), reader.tree(rank)
        with self._cond:
            prefetched = self.prefetched.get(rank)
            if prefetched is not None and prefetched.step != step:
                self._drop_prefetched(rank=rank, force=True)
                prefetched = None
            if prefetched is None:
                prefetched = self.prefetched[rank] = _Prefetched(step, layout, tree, reader.sums(rank))
            spans = prefetch.subtract(spans, prefetched.covered())
            index = PREFETCHED_SLOT - len(prefetched.pieces)
            allocate = _Allocation(self._name(rank, index))
        if not spans:
            return
        with allocate:
            done, _, seconds = prefetch.prefetch_rank(reader, rank=rank, spans=spans, allocate=allocate)
        with self._cond:
            prefetched.pieces.append(
                (done, Slot(index, allocate.segment, step=step, status=COMPLETE, tree=prefetched.tree))
            )
            prefetched.seconds += seconds
        log.info(
            "prefetched %.1f MB of old rank %d's step %d for the restore in %.2f s",
            done.nbytes / 1e6,
            rank,
            step,
            seconds,
        )

    def _drop_prefetched(self, *, rank: int | None = None, force: bool = False) -> None:
        """Free prefetched spans (of `rank`, else of every old rank) that no restore reads now (or all: `force`)."""
        for r in [rank] if rank is not None else list(self.prefetched):
            prefetched = self.prefetched[r]
            if force or not any(slot.pins for _, slot in prefetched.pieces):
                free([slot for _, slot in self.prefetched.pop(r).pieces])


def _describe(
    held: dict[int, RankSlots], *, compact: bool, ranks: list[int] | None, step: int | None
) -> dict[str, Any]:
    """Held ranks (of `ranks`, when given) for an inventory: complete steps and layout digest; unless
    `compact`, also the layout, and the JSON states and checksums of each step (of `step`, when given)."""
    found = {}
    for r, h in held.items():
        if ranks is not None and r not in ranks:
            continue
        found[str(r)] = entry = {"steps": h.complete_steps(), "digest": h.layout.digest}
        if not compact:
            steps = [s for s in h.slots if s.status == COMPLETE and step in (None, s.step)]
            entry.update(
                layout=h.layout.to_json(),
                trees={str(s.step): s.tree for s in steps},
                sums={str(s.step): s.checksums for s in steps},
            )
    return found


class _Allocation:
    """One shared memory segment named `name`, made on the call (`allocate(nbytes)` -> its bytes);
    removed again when the block it is used in fails, so no half-filled copy is ever served."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.segment: shm.Segment | None = None

    def __call__(self, nbytes: int) -> Any:
        assert self.segment is None, "one segment per allocation"
        self.segment = shm.Segment.create(self.name, nbytes)
        return self.segment.array()[:nbytes]

    def __enter__(self) -> _Allocation:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None and self.segment is not None:
            shm.unlink(self.segment.name)
            self.segment.close()
