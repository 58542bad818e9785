"""The keeper: one process per node that holds the workers' snapshots and outlives their crashes.

It owns the shared memory (workers only map it), tracks each snapshot as copied (complete on a
rank), durable (its chunks fsynced) and committed (the checkpoint sealed on every rank), and
persists steps the workers flag to the universal store from a background thread, so no training
process pays for disk I/O or holds the GIL for it. One keeper per run and node is ensured by a lock
file; whatever a dead keeper left (segments, socket) is reclaimed at start, also for other runs
whose keepers are gone. What it does ahead of a restore after a node loss is in keeper_ahead.py.

It never outlives its job: with no worker connected it holds its snapshots for the lease
(`fault.keeper_lease_s`) only while a process that can restart the workers lives (their torchrun
agent, or the worker itself when it ran alone); once that is gone it frees everything and exits. With
nothing worth keeping (no complete snapshot, no rebuilt rank, no parity for peers) it frees its
memory at once, and a keeper a worker started (`--auto`) exits too: the next worker starts another.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..erasure.coding import ErasureSetup
from ..erasure.service import ParityService, report_fields
from ..erasure.wire import advertised_host, unreachable
from ..errors import CheckpointError
from ..process import process_alive
from ..state.slot_layout import SlotLayout
from . import shm
from .protocol import (
    PROTOCOL_VERSION,
    KeeperError,
    Op,
    StoreTarget,
    decode,
    encode,
    lock_path,
    node_id,
    run_id,
    segment_name,
    socket_path,
)
from .reclaim import reclaim_stale, try_lock
from .restore_ahead import REBUILD_WAIT_S, RestoreAhead
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
REACH_TIMEOUT_S = 10.0  # for a peer keeper to accept a connection at start
ORPHAN_GRACE_S = 5.0  # how long a keeper nobody can come back to waits before it exits


class KeeperRunning(RuntimeError):
    """Another keeper of this run already serves this node."""


@dataclass
class _Conn:
    """What one worker connection holds, released when it drops (the worker died)."""

    ranks: set[int] = field(default_factory=set)
    reads: list[Slot] = field(default_factory=list)


class Keeper(RestoreAhead):
    def __init__(
        self,
        *,
        run_dir: Path,
        host_memory_bytes: int = 0,
        slots: int = 0,
        idle_timeout_s: float = 900.0,
        exit_when_finished: bool = True,
        auto: bool = False,
    ) -> None:
        if slots == 1 or slots < 0:
            raise KeeperError(f"a keeper needs at least 2 slots per rank (got {slots}); 0 picks {DEFAULT_SLOTS}")
        self.rid = run_id(run_dir)
        self.keeper_id = secrets.token_hex(3)
        self.host_memory_bytes, self.fixed_slots = host_memory_bytes, slots
        self.idle_timeout_s, self.exit_when_finished = idle_timeout_s, exit_when_finished
        self.auto = auto  # started by a worker: another is started when needed
        self.launchers: set[int] = set()  # processes that can restart this node's workers (from their registrations)
        self._idle_noted = False
        self.pids: dict[int, int] = {}  # the running incarnation's local ranks' processes
        self.watch = HangWatch()  # their progress and the peer keepers; its timeout comes with the registrations
        self.ranks: dict[int, RankSlots] = {}
        self._init_ahead()
        self._serial = 0  # numbers every segment this keeper makes
        self._budget = 0  # bytes of snapshots (and scaled shares) per node; 0: unbounded
        self._shares_over_budget: set[int] = set()  # ranks told once that their shares do not fit
        self.local_world: int | None = None
        self.token = ""
        self.target: StoreTarget | None = None
        self.finished: set[int] = set()
        self.durable = self.committed = -1
        self.failed, self.failure = -1, ""  # the newest step whose persist failed for good, and why
        self.skipped = 0
        self._jobs: dict[
            tuple[str, int], tuple[PersistJob, list[Slot]]
        ] = {}  # (incarnation, step) -> job, pinned slots
        self._persisted: set[tuple[str, int]] = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._conns = 0
        self._idle_since = time.monotonic()
        self._disk_checked = 0.0
        self._lock_fd: int | None = None
        self._sock: socket.socket | None = None
        # The store code imports torch and zarr (seconds): load it while already answering workers.
        self._persister: Any = None
        self.node = node_id()
        self.parity: ParityService | None = None
        self._loading = threading.Thread(target=self._load_persister, name="resurgo-keeper-load", daemon=True)

    # ---- life cycle ------------------------------------------------------------------------

    def start(self) -> Path:
        """Take the run's lock, reclaim what dead keepers left, listen; returns the socket path."""
        self._handlers  # noqa: B018  (built now: an operation without a handler fails here, not at a request)
        self._lock_fd = try_lock(lock_path(self.rid))
        if self._lock_fd is None:
            raise KeeperRunning(f"a keeper of run {self.rid} is already running on this node")
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        reclaim_stale(own=self.rid)
        path = socket_path(self.rid)
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.parity = ParityService(
            node=self.node,
            host=advertised_host(),
            slot_source=self._slot_bytes,
            on_protected=self._notify,
            report=self._inventory,
            on_announced=self._announced,
        )
        self.parity.start()
        self._loading.start()
        log.info("keeper %s of run %s listening on %s (pid %d)", self.keeper_id, self.rid, path, os.getpid())
        return path

    def serve_forever(self) -> None:
        assert self._sock is not None, "call start() first"
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    self._check_idle()
                    self._check_hang()
                    continue
                with self._cond:
                    self._conns += 1
                threading.Thread(target=self._serve, args=(conn,), name="resurgo-keeper-conn", daemon=True).start()
        finally:
            self._shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    def _load_persister(self) -> None:
        from .persist import Persister

        # A persist of an incarnation that ended (its ranks re-registered under a new token) waits for
        # files that dead ranks will never write: it is abandoned, not left to block the queue.
        persister = Persister(on_done=self._persist_done, is_current=lambda token: token == self.token)
        with self._cond:
            self._persister = persister
            for job, _ in self._jobs.values():
                persister.submit(job)  # queued while loading

    def _submit(self, job: PersistJob) -> None:
        """Never waits for the loading (the lock is held): until it is done, jobs wait in `_jobs`."""
        if self._persister is not None:
            self._persister.submit(job)

    def _shutdown(self) -> None:
        """Finish queued persists, then free the memory and the socket."""
        if self._loading.is_alive():
            self._loading.join()
        if self._persister is not None:
            self._persister.stop()
        self.watch.stop()
        if self.parity is not None:
            self.parity.stop()
        if self.target is not None and any(h.rank == 0 for h in self._current()):
            shutil.rmtree(self.target.coord, ignore_errors=True)  # no persist of this keeper's runs is left
        with self._cond:
            for held in self.ranks.values():
                free(held.slots)
            self.ranks.clear()
            for lost in list(self.rebuilt):
                self._drop_rebuilt(lost)
            self._drop_prefetched(force=True)
        if self._sock is not None:
            self._sock.close()
            socket_path(self.rid).unlink(missing_ok=True)
        if self._lock_fd is not None:
            lock_path(self.rid).unlink(missing_ok=True)  # while holding it: see try_lock
            os.close(self._lock_fd)
        log.info("keeper %s of run %s stopped", self.keeper_id, self.rid)

    def _check_idle(self) -> None:
        """Exit once no worker can come back to what this keeper holds, or the lease ran out."""
        with self._cond:
            if self._conns or self._jobs or self._rebuilding or self._prefetching:
                self._idle_since, self._idle_noted = time.monotonic(), False
                return
            idle = time.monotonic() - self._idle_since
            worth = self._worth_keeping()
            orphaned = bool(self.launchers) and not any(map(process_alive, self.launchers))
            if orphaned or (self.auto and not worth):
                why = (
                    f"the workers and their launcher (pid {', '.join(map(str, sorted(self.launchers)))}) are gone"
                    if orphaned
                    else "a worker started it and it holds nothing worth keeping"
                )
                if idle > ORPHAN_GRACE_S:
                    log.info("%s: keeper frees %.3g GiB and exits", why, self._held_bytes() / 2**30)
                    self._stop.set()
                return
            if not worth and self.ranks:
                log.info(
                    "no worker connected and no complete snapshot: freeing %.3g GiB of empty slots",
                    self._held_bytes() / 2**30,
                )
                for held in self.ranks.values():
                    free(held.slots)
                self.ranks.clear()
            if idle > self.idle_timeout_s:
                log.info(
                    "no worker for %.0f s (fault.keeper_lease_s): keeper frees %.3g GiB and exits",
                    self.idle_timeout_s,
                    self._held_bytes() / 2**30,
                )
                self._stop.set()
            elif not self._idle_noted and worth:
                self._idle_noted = True
                log.info(
                    "no worker connected: holding %.3g GiB for a restart for up to %.0f s (fault.keeper_lease_s)%s",
                    self._held_bytes() / 2**30,
                    self.idle_timeout_s,
                    f" while pid {', '.join(map(str, sorted(self.launchers)))} lives" if self.launchers else "",
                )

    def _check_hang(self) -> None:
        """End this node's ranks when one of them or a peer node hangs: the launcher restarts them and
        they resume from memory, instead of waiting in a collective for its timeout."""
        reason = self.watch.trouble()
        if reason is None:
            return
        with self._cond:
            pids = {r: p for r, p in self.pids.items() if process_alive(p)}
            self.pids = {}
        self.watch.forget()
        if not pids:
            log.warning("%s; no rank of this node runs now", reason)
            return
        log.error(
            "%s: ending this node's ranks %s (pids %s) so that the launcher restarts them from memory",
            reason,
            sorted(pids),
            sorted(pids.values()),
        )
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)  # a stopped process takes no other signal
            except ProcessLookupError:
                pass

    def _worth_keeping(self) -> bool:
        """Whether anything here can serve a restart: a complete snapshot, a rebuilt rank, parity for peers."""
        held = [*self.ranks.values(), *self.rebuilt.values()]
        return any(h.complete_steps() for h in held) or (self.parity is not None and self.parity.parity_bytes() > 0)

    def _held_bytes(self) -> int:
        parity = self.parity.parity_bytes() if self.parity else 0
        return sum(h.nbytes for h in [*self.ranks.values(), *self.rebuilt.values()]) + parity

    # ---- connections -----------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn()
        stream = sock.makefile("rwb")
        try:
            for line in stream:
                try:
                    reply = {"ok": True, **self.handle(decode(line), conn)}
                except (KeeperError, ValueError, KeyError, TypeError) as e:
                    reply = {
                        "ok": False,
                        "error": f"{type(e).__name__}: {e}" if not isinstance(e, KeeperError) else str(e),
                    }
                stream.write(encode(reply))
                stream.flush()
                self._maybe_exit()
        except OSError:
            pass
        finally:
            self._drop(conn)
            for closing in (stream.close, sock.close):
                try:
                    closing()
                except OSError:
                    pass

    def _drop(self, conn: _Conn) -> None:
        """A worker went away: its unfinished copies are garbage, its reads end; complete snapshots stay."""
        with self._cond:
            self._conns -= 1
            for rank in conn.ranks:
                held = self.ranks.get(rank)
                for slot in held.slots if held else ():
                    if slot.status == WRITING:
                        slot.reset()
            for slot in conn.reads:
                slot.pins -= 1
            self.watch.forget(conn.ranks)  # a dead rank is its launcher's business; a restarted one beats anew
            self._idle_since = time.monotonic()
            if conn.ranks - self.finished:
                self._start_rebuild()
            self._cond.notify_all()

    def _maybe_exit(self) -> None:
        with self._cond:
            done = self.local_world is not None and len(self.finished) >= self.local_world and not self._jobs
            if not done or not self.exit_when_finished or self._stop.is_set():
                return
            self._stop.set()
            log.info("every local rank finished: keeper exits")

    # ---- requests --------------------------------------------------------------------------

    def handle(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        try:
            op = Op(msg.get("op"))
        except ValueError:
            raise KeeperError(
                f"unknown request {msg.get('op')!r}: the worker and keeper versions differ; restart the keeper"
            ) from None
        with self._cond:
            return self._handlers[op](msg, conn)

    @functools.cached_property
    def _handlers(self) -> dict[Op, Callable[[dict[str, Any], _Conn], dict[str, Any]]]:
        """One handler per operation (a missing one fails the keeper's start, not a request)."""
        table = {
            Op.HELLO: self._op_hello,
            Op.PROTECT: self._op_protect,
            Op.REACH: self._op_reach,
            Op.INVENTORY: self._op_inventory,
            Op.HOLDINGS: self._op_holdings,
            Op.READ: self._op_read,
            Op.UNPIN: self._op_unpin,
            Op.REGISTER: self._op_register,
            Op.ACQUIRE: self._op_acquire,
            Op.COMPLETE: self._op_complete,
            Op.ABORT: self._op_abort,
            Op.PERSIST: self._op_persist,
            Op.FINISH: self._op_finish,
            Op.PROGRESS: self._op_progress,
            Op.STATUS: self._op_status,
            Op.PREFETCH: self._op_prefetch,
        }
        if set(table) != set(Op):
            raise RuntimeError(f"keeper operations without a handler: {sorted(set(Op) - set(table))}")
        return table

    def _op_hello(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        address = self.parity.address if self.parity else None
        return {
            "keeper_id": self.keeper_id,
            "pid": os.getpid(),
            "protocol": PROTOCOL_VERSION,
            "node": self.node,
            "peer_address": address,
        }

    def _op_protect(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        """The running incarnation's erasure plan (sent by local rank 0 once all ranks agreed on it)."""
        assert self.parity is not None
        if msg.get("plan") is None:
            self.parity.pause(secret=str(msg["secret"]))
            self.watch.watch_peers({})
            return {"describe": "no erasure coding: a single node"}
        protect = ErasureSetup.from_json(msg["plan"])
        plan = self.parity.protect(protect)
        self.watch.watch_peers({n: a for n, a in protect.peers.items() if n != self.node})
        return {"describe": plan.describe()}

    def _op_reach(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        """Which of the running plan's peer keepers this one cannot reach, and why (checked once per plan)."""
        plan = self.parity.newest_plan() if self.parity else None
        peers = {n: a for n, a in (plan.peers.items() if plan else ()) if n != self.node}
        self._cond.release()  # connecting takes up to the timeout: serve the workers meanwhile
        try:
            found = {node: unreachable(address, timeout=REACH_TIMEOUT_S) for node, address in peers.items()}
        finally:
            self._cond.acquire()
        return {"node": self.node, "unreachable": {n: f"{peers[n]}: {why}" for n, why in found.items() if why}}

    def _op_inventory(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        """What this node holds for a recovery, once a rebuild or prefetch under way has finished
        (unless `wait` is false: a worker asking only for the plans)."""
        deadline = time.monotonic() + (REBUILD_WAIT_S if msg.get("wait", True) else 0.0)
        while (self._rebuilding or self._prefetching) and time.monotonic() < deadline:
            self._cond.wait(timeout=1.0)
        return self._inventory(**report_fields(msg))

    def _inventory(
        self, *, compact: bool = False, ranks: list[int] | None = None, step: int | None = None
    ) -> dict[str, Any]:
        """Every held rank's complete steps and layout digest (rebuilt ones too), plans, parity; unless
        `compact`, also each rank's layout and JSON states (only of `ranks`, and of `step`, when given).
        A restore agrees on a step from compact inventories, then asks only for the ranks it reads."""
        with self._cond:
            held = {**self.rebuilt, **self.ranks}  # a rank registered here is served from its own slots
            held = {r: h for r, h in held.items() if ranks is None or r in ranks}
            ranks_json = {str(r): {"steps": h.complete_steps(), "digest": h.layout.digest} for r, h in held.items()}
            for r, h in held.items() if not compact else ():
                steps = [s for s in h.slots if s.status == COMPLETE and step in (None, s.step)]
                ranks_json[str(r)].update(
                    layout=h.layout.to_json(),
                    trees={str(s.step): s.tree for s in steps},
                    sums={str(s.step): s.checksums for s in steps},
                )
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
            "rebuilt": rebuilt,
            "prefetched": prefetched,
            "reads": reads,
            **(self.parity.inventory() if self.parity else {"node": self.node}),
        }

    def _op_holdings(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        held = self.ranks.get(int(msg["rank"]))
        return {"steps": held.complete_steps() if held else [], "digest": held.layout.digest if held else None}

    def _op_read(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        """A held snapshot's segment (pinned until unpinned), else the spans of it prefetched here."""
        prefetched = self._prefetched(msg)
        if prefetched is not None:
            for _, slot in prefetched.pieces:
                slot.pins += 1
                conn.reads.append(slot)
            pieces = [{"segment": slot.segment.name, "spans": s.to_json()} for s, slot in prefetched.pieces]
            return {
                "prefetched": pieces,
                "layout": prefetched.layout.to_json(),
                "tree": prefetched.tree,
                "checksums": prefetched.checksums,
            }
        held, slot = self._complete(msg)
        slot.pins += 1
        conn.reads.append(slot)
        return {
            "segment": slot.segment.name,
            "layout": held.layout.to_json(),
            "tree": slot.tree,
            "checksums": slot.checksums,
        }

    def _op_unpin(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        prefetched = self._prefetched(msg)
        for slot in [slot for _, slot in prefetched.pieces] if prefetched is not None else [self._complete(msg)[1]]:
            if slot in conn.reads:
                conn.reads.remove(slot)
                slot.pins -= 1
        self._cond.notify_all()
        return {}

    def _op_register(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        rank, layout, token = int(msg["rank"]), SlotLayout.from_json(msg["layout"]), str(msg["token"])
        if token != self.token:
            self.token, self.finished = token, set()
            self.failed, self.failure = -1, ""
            self.launchers, self.pids = set(), {}
            self.watch.forget()
            for stale in [r for r in self.ranks if r >= int(msg["world_size"])]:
                free(self.ranks.pop(stale).slots)
            # A new incarnation snapshots only after every rank resumed: nobody reads rebuilt ranks now.
            for lost in [r for r, h in self.rebuilt.items() if not any(s.pins for s in h.slots)]:
                self._drop_rebuilt(lost)
            self._drop_prefetched()
            self.reads.clear()
        self.local_world = int(msg["local_world_size"])
        if msg.get("pid"):
            self.pids[rank] = int(msg["pid"])
        if msg.get("hang_timeout_s") is not None:
            self.watch.timeout_s = float(msg["hang_timeout_s"])
        if msg.get("launcher"):
            self.launchers.add(int(msg["launcher"]))
        if msg.get("lease_s") and float(msg["lease_s"]) != self.idle_timeout_s:
            self.idle_timeout_s = float(msg["lease_s"])
            log.info(
                "lease: snapshots are held for up to %.0f s without workers (fault.keeper_lease_s)", self.idle_timeout_s
            )
        self.target = StoreTarget.from_json(msg["store"]) if msg.get("store") else None
        held = self.ranks.get(rank)
        if held is None or held.layout.digest != layout.digest:
            if held is not None:
                log.info("rank %d changed its snapshot layout: its held snapshots are dropped", rank)
                free(held.slots)
            self.ranks[rank] = held = RankSlots(rank, layout, token)
            self._budget = self.host_memory_bytes or int(msg.get("host_memory_bytes", 0))
            count = self._slot_count(layout, budget=self._budget)
            held.slots = [Slot(i, self._segment(rank, i, layout.nbytes)) for i in range(count)]
        elif held.token != token:
            # A new incarnation of the run: what it did not resume from belongs to another timeline.
            for slot in held.slots:
                if slot.status == COMPLETE and slot.step > int(msg.get("resumed_from", 0)) and not slot.pins:
                    slot.reset()
        held.token = token
        conn.ranks.add(rank)
        self.finished.discard(rank)
        return {"segments": [s.segment.name for s in held.slots], **self._status()}

    def _op_acquire(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        held, step, required = self._rank(msg), int(msg["step"]), bool(msg.get("required"))
        if held.find(step) is not None:
            return {"slot": None, "reason": "held", **self._status()}  # a replayed step: the same bytes are in
        deadline = time.monotonic() + WAIT_S
        # Kept: the newest protected step, and the newest this node sent its shares of (it becomes the
        # protected one when the group's parity completes). While a step newer than the protected one
        # is being coded or awaits its parity, it stays whole on every local rank, so the newest
        # complete one may go: snapshots go on when coding falls behind the steps.
        p = self.parity
        protected, coded, coding = (p.protected_step(), p.coded_step(), p.coding_step()) if p else (-1, -1, -1)
        anchor = max(coding, coded) if max(coding, coded) > protected else -1
        keep = [anchor if anchor >= 0 else newest_common(self._current()), protected, coded]
        while (slot := choose_slot(held, keep=keep, keep_newest=anchor < 0)) is None:
            if not required or time.monotonic() > deadline:
                self.skipped += 1
                return {"slot": None, "reason": "busy", **self._status()}
            self.watch.excuse(held.rank)
            self._cond.wait(timeout=1.0)
        slot.reset(WRITING, step)
        return {"slot": slot.index, "shares": self._share_space(held, slot)}

    def _op_complete(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        held, index, step = self._rank(msg), int(msg["slot"]), int(msg["step"])
        slot = held.slots[index]
        if slot.status != WRITING or slot.step != step:
            raise KeeperError(f"rank {held.rank} completed slot {index} for step {step}, which it was not writing")
        slot.status, slot.tree, slot.persist = COMPLETE, msg["tree"], bool(msg.get("persist"))
        slot.checksums = [int(c) for c in msg["checksums"]] if msg.get("checksums") is not None else None
        slot.scaled = str(msg.get("scaled") or "") if slot.shares is not None else ""
        self._maybe_persist(step)
        self._maybe_protect(step)
        self._cond.notify_all()
        return self._status()

    def _op_abort(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        slot = self._rank(msg).slots[int(msg["slot"])]
        if slot.status == WRITING:
            slot.reset()
            self._cond.notify_all()
        return {}

    def _op_persist(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        """Persist a held step although it is not a multiple of checkpoint.every (the final step)."""
        _, slot = self._complete(msg)
        slot.persist = True
        self._maybe_persist(slot.step)
        return self._status()

    def _op_finish(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        """The rank's run ended; answered once every queued persist is done, so the run ends durable."""
        rank = self._rank(msg).rank
        self.finished.add(rank)
        self.watch.forget({rank})
        deadline = time.monotonic() + WAIT_S
        while self._jobs and time.monotonic() < deadline:
            self._cond.wait(timeout=1.0)
        return self._status()

    def _op_progress(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        """A local rank finished a step (sent after every optimizer step)."""
        self.watch.beat(int(msg["rank"]), int(msg["step"]))
        return {}

    def _op_status(self, msg: dict[str, Any], conn: _Conn) -> dict[str, Any]:
        return self._status()

    # ---- helpers (called with the lock held) ------------------------------------------------

    def _rank(self, msg: dict[str, Any], *, rebuilt: bool = False) -> RankSlots:
        """A rank registered here (or, with `rebuilt`, a lost node's rank rebuilt here)."""
        held = self._held(int(msg["rank"])) if rebuilt else self.ranks.get(int(msg["rank"]))
        if held is None:
            raise KeeperError(
                f"rank {msg['rank']} is not registered with this keeper (it was restarted): register again"
            )
        return held

    def _held(self, rank: int) -> RankSlots | None:
        """A rank's slots: its own registration here, else a rebuilt copy of a lost node's rank."""
        return self.ranks.get(rank) or self.rebuilt.get(rank)

    def _complete(self, msg: dict[str, Any]) -> tuple[RankSlots, Slot]:
        """A complete snapshot of a held rank (its own or, for a recovery, a rebuilt one)."""
        held = self._rank(msg, rebuilt=True)
        slot = held.find(int(msg["step"]))
        if slot is None:
            raise KeeperError(
                f"rank {held.rank} has no complete snapshot of step {msg['step']} (held: {held.complete_steps()})"
            )
        return held, slot

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
            held = self._held(rank)
            slot = held.find(step) if held else None
            return slot.segment.array()[: held.layout.nbytes] if slot is not None and held is not None else None

    def _notify(self) -> None:
        with self._cond:
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

    def _status(self) -> dict[str, Any]:
        """copied: newest step complete on every local rank; durable / committed: newest persisted."""
        # Commits by another node's keeper show on disk; look once the store code is loaded (never
        # import it here: the lock is held).
        if self.target is not None and self._persister is not None and time.monotonic() - self._disk_checked > 1.0:
            from ..store.commit import committed

            found = committed(Path(self.target.root))
            self.committed = max([self.committed] + [step for step, _ in found])
            self._disk_checked = time.monotonic()
        return {
            "copied": newest_common(self._current()),
            "durable": self.durable,
            "committed": self.committed,
            "failed": self.failed,
            "failure": self.failure,
            "backlog": len(self._jobs),
            "host_bytes": sum(h.nbytes for h in self.ranks.values()),
            "skipped": self.skipped,
            "protected": self.parity.protected_step() if self.parity else -1,
            "parity_bytes": self.parity.parity_bytes() if self.parity else 0,
            "protect_cpu_s": round(self.parity.cpu_s(), 4) if self.parity else 0.0,
        }
