"""The keeper: one process per node that holds the workers' snapshots and outlives their crashes.

It owns the shared memory (workers only map it), tracks each snapshot as copied (complete on a
rank), durable (its chunks fsynced) and committed (the checkpoint sealed on every rank), and
persists steps the workers flag to the universal store from a background thread, so no training
process pays for disk I/O or holds the GIL for it. One keeper per run and node is ensured by a lock
file; whatever a dead keeper left (segments, socket) is reclaimed at start, also for other runs
whose keepers are gone. Its slot operations are in holding.py; its inventory, and what it does
ahead of a restore after a node loss, in restore_ahead.py.

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
from pathlib import Path
from typing import Any

from ..erasure.coding import ErasureSetup
from ..erasure.service import ParityService
from ..erasure.wire import advertised_host, unreachable
from ..process import process_alive
from . import messages as m
from .holding import Conn, SlotHolding
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
    socket_path,
)
from .reclaim import reclaim_stale, try_lock
from .restore_ahead import RestoreAhead
from .slots import DEFAULT_SLOTS, WRITING, PersistJob, RankSlots, Slot, free
from .watch import HangWatch

log = logging.getLogger(__name__)

REACH_TIMEOUT_S = 10.0  # for a peer keeper to accept a connection at start
ORPHAN_GRACE_S = 5.0  # how long a keeper nobody can come back to waits before it exits


class KeeperRunning(RuntimeError):
    """Another keeper of this run already serves this node."""


class Keeper(SlotHolding, RestoreAhead):
    """The server: its socket, one thread per connection, one table from operation to handler (the
    slot operations are in holding.py, the restore's in restore_ahead.py), and its life cycle."""

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
        self.supervisors: dict[int, int] = {}  # their warm-restart supervisors, where they have one
        self.watch = HangWatch()  # their progress and the peer keepers; its timeout comes with the registrations
        self.ranks: dict[int, RankSlots] = {}
        self.superseded: dict[int, RankSlots] = {}
        # The connection that registered each rank last: a warm restart's successor may register before
        # its fenced predecessor's connection is seen closing, and what the successor began is its own.
        self.registered: dict[int, Conn] = {}
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
            on_protected=self._protected,
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
            for held in [*self.ranks.values(), *self.superseded.values()]:
                free(held.slots)
            self.ranks.clear()
            self.superseded.clear()
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
        trouble = self.watch.trouble()
        if trouble is None:
            return
        reason = trouble.reason
        with self._cond:
            # A hung rank: its worker goes, and a warm restart forks another. A lost peer node: the
            # world shrinks, which only torchrun's re-rendezvous can do: the supervisors go too.
            ending = {**self.pids, **self.supervisors} if trouble.peer_lost else self.pids
            pids = {r: p for r, p in ending.items() if process_alive(p)}
            self.pids, self.supervisors = {}, {}
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
        held = [h for kind in self._holdings() for h in kind.values()]
        return any(h.complete_steps() for h in held) or (self.parity is not None and self.parity.parity_bytes() > 0)

    def _held_bytes(self) -> int:
        parity = self.parity.parity_bytes() if self.parity else 0
        return sum(h.nbytes for kind in self._holdings() for h in kind.values()) + parity

    # ---- connections -----------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        conn = Conn()
        stream = sock.makefile("rwb")
        try:
            for line in stream:
                try:
                    reply = {"ok": True, **self.handle(decode(line), conn).to_json()}
                except (KeeperError, ValueError) as e:  # MalformedMessage is a ValueError
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

    def _drop(self, conn: Conn) -> None:
        """A worker went away: its unfinished copies are garbage, its reads end; complete snapshots stay."""
        with self._cond:
            self._conns -= 1
            owned = {rank for rank in conn.ranks if self.registered.get(rank) is conn}
            for rank in owned:
                del self.registered[rank]
                held = self.ranks.get(rank)
                for slot in held.slots if held else ():
                    if slot.status == WRITING:
                        slot.reset()
            for slot in conn.reads:
                slot.pins -= 1
            self.watch.forget(owned)  # a dead rank is its launcher's business; a restarted one beats anew
            self._idle_since = time.monotonic()
            if owned - self.finished:
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

    def handle(self, msg: dict[str, Any], conn: Conn) -> m.Reply:
        """The reply to one decoded frame; MalformedMessage (a ValueError) when it is no request."""
        request = m.parse(msg)
        with self._cond:
            return self._handlers[request.op](request, conn)

    @functools.cached_property
    def _handlers(self) -> dict[Op, Callable[[Any, Conn], m.Reply]]:
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
            Op.FORGET: self._op_forget,
        }
        if set(table) != set(Op):
            raise RuntimeError(f"keeper operations without a handler: {sorted(set(Op) - set(table))}")
        return table

    def _op_hello(self, req: m.Hello, conn: Conn) -> m.HelloReply:
        address = self.parity.address if self.parity else None
        return m.HelloReply(self.keeper_id, os.getpid(), PROTOCOL_VERSION, self.node, address)

    def _op_protect(self, req: m.Protect, conn: Conn) -> m.ProtectReply:
        """The running incarnation's erasure plan (sent by local rank 0 once all ranks agreed on it)."""
        assert self.parity is not None
        if req.plan is None:
            self.parity.pause(secret=req.secret)
            self.watch.watch_peers({})
            return m.ProtectReply("no erasure coding: a single node")
        protect = ErasureSetup.from_json(req.plan)
        plan = self.parity.protect(protect)
        self.watch.watch_peers({n: a for n, a in protect.peers.items() if n != self.node})
        return m.ProtectReply(plan.describe())

    def _op_reach(self, req: m.Reach, conn: Conn) -> m.ReachReply:
        """Which of the running plan's peer keepers this one cannot reach, and why (checked once per plan)."""
        plan = self.parity.newest_plan() if self.parity else None
        peers = {n: a for n, a in (plan.peers.items() if plan else ()) if n != self.node}
        self._cond.release()  # connecting takes up to the timeout: serve the workers meanwhile
        try:
            found = {node: unreachable(address, timeout=REACH_TIMEOUT_S) for node, address in peers.items()}
        finally:
            self._cond.acquire()
        return m.ReachReply(self.node, {n: f"{peers[n]}: {why}" for n, why in found.items() if why})
