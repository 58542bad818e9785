"""The keeper's snapshot slots: what each local rank registered, copies into, completes, reads and
persists, and the keeper's status (`messages.Status`) that every such reply carries.

A part of `Keeper` (server.py), kept apart because it is the bookkeeping of the slots, not the
serving: every method here runs with the keeper's lock (`_cond`) held.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..erasure.service import ParityService
from ..errors import CheckpointError
from ..state.slot_layout import SlotLayout
from . import messages as m
from . import shm
from .protocol import KeeperError, StoreTarget, segment_name
from .slots import (
    COMPLETE,
    DEFAULT_SLOTS,
    WRITING,
    PersistJob,
    RankData,
    RankSlots,
    Slot,
    choose_slot,
    free,
    newest_common,
)
from .watch import HangWatch

log = logging.getLogger(__name__)

WAIT_S = 900.0  # longest a required snapshot or a finishing worker waits for a persist


@dataclass
class Conn:
    """What one worker connection holds, released when it drops (the worker died)."""

    ranks: set[int] = field(default_factory=set)
    reads: list[Slot] = field(default_factory=list)


class SlotHolding:
    """The slot operations and their helpers, mixed into `Keeper`."""

    _cond: threading.Condition
    parity: ParityService | None
    watch: HangWatch
    ranks: dict[int, RankSlots]
    rebuilt: dict[int, RankSlots]
    superseded: dict[int, RankSlots]  # earlier incarnations' snapshots kept for a recovery (`_supersede`)
    registered: dict[int, Conn]

    def _op_holdings(self, req: m.Holdings, conn: Conn) -> m.HoldingsReply:
        held = self.ranks.get(req.rank)
        return m.HoldingsReply(held.complete_steps() if held else [], held.layout.digest if held else None)

    def _op_read(self, req: m.Read, conn: Conn) -> m.ReadReply:
        """A held snapshot's segment (pinned until unpinned), else the spans of it prefetched here."""
        prefetched = self._prefetched(req.rank, req.step)
        if prefetched is not None:
            for _, slot in prefetched.pieces:
                slot.pins += 1
                conn.reads.append(slot)
            pieces = [{"segment": slot.segment.name, "spans": s.to_json()} for s, slot in prefetched.pieces]
            return m.ReadReply(prefetched.layout.to_json(), prefetched.tree, prefetched.checksums, prefetched=pieces)
        held, slot = self._complete(req.rank, req.step)
        slot.pins += 1
        conn.reads.append(slot)
        return m.ReadReply(held.layout.to_json(), slot.tree, slot.checksums, segment=slot.segment.name)

    def _op_unpin(self, req: m.Unpin, conn: Conn) -> m.Empty:
        prefetched = self._prefetched(req.rank, req.step)
        whole = [self._complete(req.rank, req.step)[1]] if prefetched is None else []
        for slot in [slot for _, slot in prefetched.pieces] if prefetched is not None else whole:
            if slot in conn.reads:
                conn.reads.remove(slot)
                slot.pins -= 1
        self._cond.notify_all()
        return m.Empty()

    def _op_register(self, req: m.Register, conn: Conn) -> m.RegisterReply:
        rank, layout, token = req.rank, SlotLayout.from_json(req.layout), req.token
        if token != self.token:
            self.token, self.finished = token, set()
            self.failed, self.failure = -1, ""
            self.launchers, self.pids, self.supervisors = set(), {}, {}
            self.watch.forget()
            for stale in [r for r in self.ranks if r >= req.world_size]:
                self._supersede(self.ranks.pop(stale))
            # A new incarnation snapshots only after every rank resumed: nobody reads rebuilt ranks now.
            for lost in [r for r, h in self.rebuilt.items() if not any(s.pins for s in h.slots)]:
                self._drop_rebuilt(lost)
            self._release_superseded()
            self._drop_prefetched()
            self.reads.clear()
        self.local_world = req.local_world_size
        if req.pid:
            self.pids[rank] = req.pid
        if req.supervisor:
            self.supervisors[rank] = req.supervisor
        if req.hang_timeout_s is not None:
            self.watch.timeout_s = req.hang_timeout_s
        if req.peer_timeout_s is not None:
            self.watch.peer_timeout_s = req.peer_timeout_s
        if req.launcher:
            self.launchers.add(req.launcher)
        if req.lease_s and req.lease_s != self.idle_timeout_s:
            self.idle_timeout_s = req.lease_s
            log.info(
                "lease: snapshots are held for up to %.0f s without workers (fault.keeper_lease_s)", self.idle_timeout_s
            )
        self.target = StoreTarget.from_json(req.store) if req.store else None
        held = self.ranks.get(rank)
        if held is None or held.layout.digest != layout.digest:
            self._budget = self.host_memory_bytes or req.host_memory_bytes
            count = self._slot_count(layout, budget=self._budget)
            slots = [Slot(i, self._segment(rank, i, layout.nbytes)) for i in range(count)]
            old, self.ranks[rank] = held, RankSlots(rank, layout, token, slots=slots)
            if old is not None:
                self._supersede(old)  # after the new slots: what it keeps must fit beside them
            held = self.ranks[rank]
        elif held.token != token:
            # A new incarnation of the run: what it did not resume from belongs to another timeline.
            for slot in held.slots:
                if slot.status == COMPLETE and slot.step > req.resumed_from and not slot.pins:
                    slot.reset()
            earlier = self.parity.protected_of(held.token) if self.parity else -1
            held.earlier = earlier if len(held.slots) > 2 else -1  # with two slots, keeping one would stall
        held.token = token
        conn.ranks.add(rank)
        self.registered[rank] = conn
        self.watch.forget({rank})  # a restarted rank beats anew, from its first step
        self.finished.discard(rank)
        return m.RegisterReply([s.segment.name for s in held.slots], self._status())

    def _op_acquire(self, req: m.Acquire, conn: Conn) -> m.AcquireReply:
        held, step, required = self._rank(req.rank), req.step, req.required
        if held.find(step) is not None:
            return m.AcquireReply(reason="held", status=self._status())  # a replayed step: the same bytes are in
        deadline = time.monotonic() + WAIT_S
        # Kept: the newest protected step, and the newest this node sent its shares of (it becomes the
        # protected one when the group's parity completes). While a step newer than the protected one
        # is being coded or awaits its parity, it stays whole on every local rank, so the newest
        # complete one may go: snapshots go on when coding falls behind the steps.
        p = self.parity
        protected, coded, coding = (p.protected_step(), p.coded_step(), p.coding_step()) if p else (-1, -1, -1)
        anchor = max(coding, coded) if max(coding, coded) > protected else -1
        keep = [anchor if anchor >= 0 else newest_common(self._current()), protected, coded]
        if p and p.protected_of(held.token) < 0:
            keep.append(held.earlier)
        while (slot := choose_slot(held, keep=keep, keep_newest=anchor < 0)) is None:
            if not required or time.monotonic() > deadline:
                self.skipped += 1
                return m.AcquireReply(reason="busy", status=self._status())
            self.watch.excuse(held.rank)
            self._cond.wait(timeout=1.0)
        slot.reset(WRITING, step)
        return m.AcquireReply(slot.index, shares=self._share_space(held, slot))

    def _op_complete(self, req: m.Complete, conn: Conn) -> m.Status:
        held, index, step = self._rank(req.rank), req.slot, req.step
        slot = held.slots[index]
        if slot.status != WRITING or slot.step != step:
            raise KeeperError(f"rank {held.rank} completed slot {index} for step {step}, which it was not writing")
        slot.status, slot.tree, slot.persist = COMPLETE, req.tree, req.persist
        slot.checksums = [int(c) for c in req.checksums] if req.checksums is not None else None
        slot.scaled = req.scaled if slot.shares is not None else ""
        self._maybe_persist(step)
        self._maybe_protect(step)
        self._cond.notify_all()
        return self._status()

    def _op_abort(self, req: m.Abort, conn: Conn) -> m.Empty:
        slot = self._rank(req.rank).slots[req.slot]
        if slot.status == WRITING:
            slot.reset()
            self._cond.notify_all()
        return m.Empty()

    def _op_persist(self, req: m.Persist, conn: Conn) -> m.Status:
        """Persist a held step although it is not a multiple of checkpoint.every (the final step)."""
        _, slot = self._complete(req.rank, req.step)
        slot.persist = True
        self._maybe_persist(slot.step)
        return self._status()

    def _op_finish(self, req: m.Finish, conn: Conn) -> m.Status:
        """The rank's run ended; answered once every queued persist is done, so the run ends durable."""
        rank = self._rank(req.rank).rank
        self.finished.add(rank)
        self.watch.forget({rank})
        deadline = time.monotonic() + WAIT_S
        while self._jobs and time.monotonic() < deadline:
            self._cond.wait(timeout=1.0)
        return self._status()

    def _op_progress(self, req: m.Progress, conn: Conn) -> m.Empty:
        """A local rank finished a step (sent after every optimizer step)."""
        self.watch.beat(req.rank, req.step)
        return m.Empty()

    def _op_forget(self, req: m.Forget, conn: Conn) -> m.Empty:
        held = self.ranks.pop(req.rank, None)
        if held is not None:
            free(held.slots)
            log.warning("rank %d's snapshots are dropped at its request (a simulated loss of its memory)", req.rank)
        conn.ranks.discard(req.rank)
        if self.registered.get(req.rank) is conn:
            del self.registered[req.rank]
        self._cond.notify_all()
        return m.Empty()

    def _op_status(self, req: m.StatusRequest, conn: Conn) -> m.Status:
        return self._status()

    # ---- helpers (called with the lock held) ------------------------------------------------

    def _rank(self, rank: int) -> RankSlots:
        """A rank registered here."""
        held = self.ranks.get(rank)
        if held is None:
            raise KeeperError(f"rank {rank} is not registered with this keeper (it was restarted): register again")
        return held

    def _holdings(self) -> list[dict[int, RankSlots]]:
        """Every rank's slots held here, by kind: registered, rebuilt for a lost node, superseded."""
        return [self.ranks, self.rebuilt, self.superseded]

    def _holding(self, rank: int, step: int) -> tuple[RankSlots, Slot] | None:
        """Old rank `rank`'s complete snapshot of `step`, whichever kind holds it, None if none does.
        A rank number may be held twice (superseded, and registered anew with another layout); the
        step tells which: the running incarnation snapshots only steps after the one it resumed from."""
        for kind in self._holdings():
            held = kind.get(rank)
            if held is not None and (slot := held.find(step)) is not None:
                return held, slot
        return None

    def _complete(self, rank: int, step: int) -> tuple[RankSlots, Slot]:
        """A complete snapshot held here (of a registered rank or, for a recovery, any held one)."""
        found = self._holding(rank, step)
        if found is None:
            held = [s for kind in self._holdings() if rank in kind for s in kind[rank].complete_steps()]
            raise KeeperError(f"rank {rank} has no complete snapshot of step {step} (held: {sorted(held)})")
        return found

    def _supersede(self, held: RankSlots) -> None:
        """An earlier incarnation's rank that the running one registered anew with another layout (or
        left out): until the running one protects a step, a node lost meanwhile is rebuilt from the
        step the earlier one protected, so that step's slot stays (if the memory budget has room for
        it beside the new slots); the rest is freed."""
        step = self.parity.protected_of(held.token) if self.parity and held.token != self.token else -1
        slot = held.find(step) if step >= 0 else None
        now = self.ranks.get(held.rank)
        room = not self._budget or (now.nbytes if now else 0) + (slot.segment.size if slot else 0) <= (
            self._budget // max(self.local_world or 1, 1)
        )
        why = "registered anew with another layout" if now else "not in the new world"
        if slot is None or not room:
            log.info("rank %d is %s: its held snapshots are dropped", held.rank, why)
            free(held.slots)
            return
        log.info(
            "rank %d is %s: its snapshot of step %d, protected by the last incarnation, is kept until this one "
            "protects a step",
            held.rank,
            why,
            step,
        )
        free([s for s in held.slots if s is not slot])
        if (older := self.superseded.get(held.rank)) is not None:
            free(older.slots)
        self.superseded[held.rank] = RankSlots(held.rank, held.layout, held.token, slots=[slot])

    def _release_superseded(self) -> None:
        """Free the superseded snapshots once the running incarnation protected a step of its own, or
        their incarnation's plan is forgotten (unless a restore still reads them)."""
        if self.parity is None:
            return
        running = self.parity.protected_of(self.token) >= 0
        for rank, held in list(self.superseded.items()):
            if (running or self.parity.protected_of(held.token) < 0) and not any(s.pins for s in held.slots):
                free(self.superseded.pop(rank).slots)

    def _current(self) -> list[RankSlots]:
        """The ranks registered by the running incarnation (older ones only serve restores)."""
        return [held for held in self.ranks.values() if held.token == self.token]

    def _slot_count(self, layout: SlotLayout, *, budget: int) -> int:
        if self.fixed_slots:
            return self.fixed_slots
        if not budget or not layout.nbytes:
            return DEFAULT_SLOTS
        fits = budget // max(self.local_world or 1, 1) // layout.nbytes
        if fits < 2:
            need = 2 * layout.nbytes * (self.local_world or 1)
            raise KeeperError(
                f"checkpoint.host_memory_gb={budget / 2**30:.3g} holds {fits} snapshot(s) per local rank of "
                f"{layout.nbytes / 2**30:.3g} GiB; at least 2 are needed: raise it to {need / 2**30:.3g} or more, "
                "or set checkpoint.snapshot_every=0"
            )
        return min(fits, DEFAULT_SLOTS)

    def _share_space(self, held: RankSlots, slot: Slot) -> dict[str, Any] | None:
        """Where and how the worker scales this slot's parity shares before handing it back
        (fault.erasure.encode=device), None when the holders scale them."""
        current = self._current()
        if self.parity is None or held.token != self.token or len(current) < (self.local_world or 0):
            return None
        recipe = self.parity.share_recipe(held.rank, {h.rank: h.layout.nbytes for h in current})
        if recipe is None or not recipe.rows:
            return None
        need = recipe.rows * held.layout.nbytes  # a slot's shares; every slot gets them or none does
        per_rank = self._budget // max(self.local_world or 1, 1)
        if self._budget and sum(s.segment.size + need for s in held.slots) > per_rank:
            if held.rank not in self._shares_over_budget:  # snapshot slots come first: the holders can scale
                self._shares_over_budget.add(held.rank)
                log.warning(
                    "rank %d's scaled shares (%.3g GiB a slot) do not fit checkpoint.host_memory_gb=%.3g beside "
                    "its snapshots: the holders scale them; raise it to let the workers scale",
                    held.rank,
                    need / 2**30,
                    self._budget / 2**30,
                )
            return None
        try:
            segment = slot.share_space(lambda: self._name(held.rank, slot.index), need)
        except CheckpointError as e:  # a full /dev/shm costs the holders' CPU, never a snapshot
            log.warning("rank %d's scaled shares find no memory, the holders scale them: %s", held.rank, e)
            return None
        return {"segment": segment.name, "recipe": recipe.to_json()}

    def _name(self, rank: int, index: int) -> str:
        self._serial += 1
        return segment_name(self.rid, keeper_id=self.keeper_id, rank=rank, slot=index, serial=self._serial)

    def _segment(self, rank: int, index: int, nbytes: int) -> shm.Segment:
        return shm.Segment.create(self._name(rank, index), nbytes)

    def _maybe_persist(self, step: int) -> None:
        """Queue `step` once every local rank holds it complete and flagged for persisting."""
        current = self._current()
        if self.target is None or self.local_world is None or len(current) < self.local_world:
            return
        key = (self.target.token, step)
        slots = [held.find(step) for held in current]
        if key in self._persisted or any(s is None or not s.persist for s in slots):
            return
        self._persisted.add(key)
        ranks = {h.rank: RankData(h.layout, s.segment.array(), s.tree) for h, s in zip(current, slots)}
        job = PersistJob(step, self.target, ranks, committer=any(h.rank == 0 for h in current))
        for slot in slots:
            slot.pins += 1
        self._jobs[key] = (job, slots)
        self._submit(job)

    def _maybe_protect(self, step: int) -> None:
        """Hand `step` to the erasure coder once every local rank holds it (skipped while it is busy)."""
        current = self._current()
        if self.parity is None or self.parity.current is None or len(current) < (self.local_world or 0):
            return
        slots = [held.find(step) for held in current]
        if any(s is None for s in slots):
            return
        ranks = {h.rank: (h.layout, s.segment.array()[: h.layout.nbytes], s.tree) for h, s in zip(current, slots)}
        sums = {h.rank: s.checksums for h, s in zip(current, slots)}
        shares = {
            h.rank: (s.scaled, s.shares.array()) for h, s in zip(current, slots) if s.scaled and s.shares is not None
        }
        for slot in slots:
            slot.pins += 1

        def release() -> None:
            with self._cond:
                for slot in slots:
                    slot.pins -= 1
                self._cond.notify_all()

        if not self.parity.submit(step, ranks, release, shares, sums=sums):
            for slot in slots:
                slot.pins -= 1

    def _announced(self, step: int) -> None:
        """The group's leader codes `step`: code it here too if every local rank holds it (else on completion)."""
        with self._cond:
            self._maybe_protect(step)

    def _slot_bytes(self, rank: int, step: int) -> Any:
        """A held rank's complete snapshot of `step` (for a peer's recovery), None if not held."""
        with self._cond:
            found = self._holding(rank, step)
            return found[1].segment.array()[: found[0].layout.nbytes] if found is not None else None

    def _protected(self) -> None:
        """The parity service protected a step."""
        with self._cond:
            self._release_superseded()
            self._cond.notify_all()

    def _persist_done(self, job: PersistJob, phase: str, error: str | None) -> None:
        with self._cond:
            if phase == "durable":
                self.durable = max(self.durable, job.step)
            elif phase == "committed":
                self.committed = max(self.committed, job.step)
            elif phase == "failed" and job.target.token == self.token and job.step > self.failed:
                self.failed, self.failure = job.step, error or "unknown error"
            if phase == "failed" or phase == "committed" or (phase == "durable" and not job.committer):
                _, slots = self._jobs.pop((job.target.token, job.step), (None, []))
                for slot in slots:
                    slot.pins -= 1
                self._idle_since = time.monotonic()
            self._cond.notify_all()

    def _status(self) -> m.Status:
        """copied: newest step complete on every local rank; durable / committed: newest persisted."""
        # Commits by another node's keeper show on disk; look once the store code is loaded (never
        # import it here: the lock is held).
        if self.target is not None and self._persister is not None and time.monotonic() - self._disk_checked > 1.0:
            from ..store.commit import committed

            found = committed(Path(self.target.root))
            self.committed = max([self.committed] + [step for step, _ in found])
            self._disk_checked = time.monotonic()
        p = self.parity
        return m.Status(
            copied=newest_common(self._current()),
            durable=self.durable,
            committed=self.committed,
            failed=self.failed,
            failure=self.failure,
            backlog=len(self._jobs),
            host_bytes=sum(h.nbytes for h in self.ranks.values()),
            skipped=self.skipped,
            protected=p.protected_step() if p else -1,
            parity_bytes=p.parity_bytes() if p else 0,
            protect_cpu_s=round(p.cpu_s(), 4) if p else 0.0,
        )
