"""Lazy asynchronous snapshots: a StepHook whose `begin` returns at once and whose copy overlaps compute.

`begin(step)` runs right after `optimizer.step()`: it takes references to the parameters and
optimizer state (they do not change until the next step), copies at once what may change during
forward, captures the JSON state, and hands the rest to a background thread. That thread asks the
keeper for a slot and copies tensor by tensor into the keeper's shared memory: on GPU as
asynchronous copies on a side stream into pinned memory, ordered after the optimizer step by an
event; on CPU with `copy_`, which releases the GIL. `fence()` runs right before the next
`optimizer.step()` and waits for that copy only; persisting to disk is the keeper's business.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from ..erasure import code as erasure
from ..erasure.coding import ShareRecipe
from ..errors import SaveFailed
from ..keeper import messages as m
from ..keeper.client import KeeperLink
from ..keeper.protocol import KeeperGone, StoreTarget
from ..keeper.shm import Segment
from ..state import checksum
from ..state.slot_layout import SlotLayout
from .capture import Captured, StateCapture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """What a worker tells its keeper about itself (with its slot layout)."""

    rank: int
    local_world_size: int
    world_size: int
    token: str  # hex, one per run incarnation, agreed by all ranks
    store: StoreTarget | None  # None: nothing is persisted
    host_memory_bytes: int = 0  # 0: the keeper's default
    resumed_from: int = 0  # the step this incarnation started from: held snapshots of later steps are stale
    launcher: int = 0  # the process that can restart this worker (its torchrun agent, else itself)
    lease_s: float = 0.0  # how long the keeper holds snapshots without workers while the launcher lives; 0: its own
    hang_timeout_s: float = (
        0.0  # a rank without a finished step for this long is hung: the keeper ends the node's ranks
    )
    peer_timeout_s: float = 0.0  # a peer keeper silent for this long: its node is lost (0: hang_timeout_s)
    supervisor: int = 0  # the warm-restart supervisor that forked this worker (0: none)

    def message(self, layout: SlotLayout) -> m.Register:
        return m.Register(
            rank=self.rank,
            local_world_size=self.local_world_size,
            world_size=self.world_size,
            token=self.token,
            layout=layout.to_json(),
            store=self.store.to_json() if self.store else None,
            host_memory_bytes=self.host_memory_bytes,
            resumed_from=self.resumed_from,
            launcher=self.launcher,
            lease_s=self.lease_s,
            pid=os.getpid(),
            hang_timeout_s=self.hang_timeout_s,
            peer_timeout_s=self.peer_timeout_s,
            supervisor=self.supervisor or None,
        )


@dataclass
class SnapshotStats:
    """What the hook reports per step; steps are -1 until the first one."""

    begin_s: float = 0.0
    fence_s: float = 0.0
    step: int = 0  # newest step snapshotted or skipped
    copied: int = -1  # newest step whose copy is complete on this rank
    durable: int = -1
    committed: int = -1
    protected: int = -1  # newest step whose parity is complete on every node of this node's group
    backlog: int = 0
    host_bytes: int = 0
    parity_bytes: int = 0  # parity this node's keeper holds for its group's snapshots
    protect_cpu_s: float = 0.0  # CPU time this node's keeper has spent on erasure coding so far
    skipped: int = 0
    failed: int = -1  # newest step the keeper could not persist, after its retries
    failure: str = ""  # the keeper's reason

    def metrics(self) -> dict[str, float]:
        return {
            "snapshot_begin_ms": round(self.begin_s * 1e3, 3),
            "snapshot_fence_ms": round(self.fence_s * 1e3, 3),
            "snapshot_age": self.step - self.copied if self.copied >= 0 else -1,
            "snapshot_skipped": self.skipped,
            "persist_backlog": self.backlog,
            "durable_step": self.durable,
            "committed_step": self.committed,
            "persist_failed_step": self.failed,
            "protected_step": self.protected,
            "protection_lag": self.step - self.protected if self.protected >= 0 else -1,
            "host_mem_gib": round(self.host_bytes / 2**30, 4),
            "parity_mem_gib": round(self.parity_bytes / 2**30, 4),
            "protect_cpu_s": self.protect_cpu_s,
        }


class SnapshotEngine:
    """The StepHook: snapshot every `every` steps (and every `persist_every`-th, which the keeper persists)."""

    def __init__(
        self,
        *,
        capture: StateCapture,
        link: KeeperLink,
        registration: Registration,
        every: int = 1,
        persist_every: int = 0,
        device: torch.device | None = None,
    ) -> None:
        if every < 0 or persist_every < 0:
            raise ValueError("checkpoint.snapshot_every and checkpoint.every must be >= 0")
        self.capture, self.link, self.registration = capture, link, registration
        self.every, self.persist_every = every, persist_every
        self.copier = CudaCopier(device) if device is not None and device.type == "cuda" else HostCopier()
        self.stats = SnapshotStats()
        self._thread = _Background(device)
        self._pending: Future | None = None
        self._registered: tuple[str | None, str] | None = None
        self._views: list[list[torch.Tensor]] = []
        self._slots: list[torch.Tensor] = []  # each slot's bytes
        self._lost_since: int | None = None

    # ---- StepHook ---------------------------------------------------------------------------

    def before_optimizer_step(self) -> None:
        self.fence()

    def after_optimizer_step(self, step: int) -> None:
        self.check_saved()  # after the step's metrics are logged: they show the failure too
        if self.due(step):
            self.begin(step, persist=self.persist_due(step))
        else:
            self.stats.begin_s = 0.0

    def due(self, step: int) -> bool:
        return bool((self.every and step % self.every == 0) or self.persist_due(step))

    def persist_due(self, step: int) -> bool:
        return bool(self.persist_every and step % self.persist_every == 0)

    # ---- the two halves ---------------------------------------------------------------------

    def begin(self, step: int, *, persist: bool = False) -> None:
        """Capture `step` and start copying it in the background; returns without waiting."""
        start = time.perf_counter()
        if self._pending is not None:
            self.fence()
        captured = self.capture.take(step)
        ready = self.copier.mark()
        self.stats.step = step
        self._pending = self._thread.submit(lambda: self._snapshot(captured, ready, persist))
        self.stats.begin_s = time.perf_counter() - start

    def fence(self) -> None:
        """Wait until the snapshot begun last is in the keeper's memory (or was skipped)."""
        start = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except KeeperGone as e:
                self._keeper_lost(e)
        self.stats.fence_s = time.perf_counter() - start

    def check_saved(self) -> None:
        """Stop the run when a checkpoint was lost: training on would pile up work no disk holds."""
        if self.stats.failed >= 0:
            raise SaveFailed(
                f"the checkpoint of step {self.stats.failed} could not be written after retries: {self.stats.failure}. "
                f"The newest committed checkpoint is step {self.stats.committed}: fix the file system (free space, "
                "permissions) or set checkpoint.dir elsewhere, then restart with checkpoint.resume=latest"
            )

    def close(self) -> None:
        """Wait for the copy under way and stop (a failed save is raised by `after_optimizer_step`
        and by the end of the run, never here: after a failure it would hide the first error)."""
        try:
            self.fence()
        finally:
            self._thread.stop()

    # ---- background -------------------------------------------------------------------------

    def _snapshot(self, captured: Captured, ready: Any, persist: bool) -> None:
        if not self._ensure_registered():
            self.stats.skipped += 1
            return
        rank, step = self.registration.rank, captured.step
        reply: m.AcquireReply = self.link.call(m.Acquire(rank, step, required=persist))
        self.update_status(reply.status)
        slot = reply.slot
        if slot is None:
            if reply.reason == "held":
                self.stats.copied = step
            else:
                self.stats.skipped += 1
            return
        shares = self._shares(slot, reply.shares)
        try:
            self.copier.copy(self._views[slot], captured.tensors, ready, shares=shares)
            # Checked by every restore from memory, from peers or from parity (checksum.py).
            sums = checksum.checksums(self._slots[slot].numpy(), self.capture.layout)
        except BaseException:
            self.link.call(m.Abort(rank, slot))
            raise
        self.update_status(
            self.link.call(
                m.Complete(
                    rank,
                    slot,
                    step,
                    tree=captured.tree,
                    persist=persist,
                    scaled=shares.recipe.token if shares else "",
                    checksums=sums,
                )
            )
        )
        self.stats.copied = step

    def _shares(self, slot: int, where: dict[str, Any] | None) -> Shares | None:
        """What to scale this snapshot's parity shares into, when the keeper asks for them."""
        if not where:
            return None
        (segment,) = self.link.map([where["segment"]])
        layout = self.capture.layout
        assert layout is not None
        return Shares(
            ShareRecipe.from_json(where["recipe"]), torch.from_numpy(segment.array()), self._slots[slot], layout
        )

    def _ensure_registered(self) -> bool:
        """Connected and registered with the current layout; local rank 0 restarts a lost keeper."""
        if self.link.client is None and not self.link.connect(wait_s=0.0):
            return False
        layout = self.capture.layout
        assert layout is not None, "take() builds the layout before the first copy"
        if self._registered != (self.link.keeper_id, layout.digest):
            reply: m.RegisterReply = self.link.call(self.registration.message(layout))
            segments = self.link.map(reply.segments)
            self._views = [slot_views(s, layout) for s in segments]
            self._slots = [torch.from_numpy(s.array()) for s in segments]
            self._registered = (self.link.keeper_id, layout.digest)
            self.update_status(reply.status)
            if self._lost_since is not None:
                log.warning(
                    "rank %d: memory snapshots resume with keeper %s at step %d",
                    self.registration.rank,
                    self.link.keeper_id,
                    self.stats.step,
                )
                self._lost_since = None
        return True

    def _keeper_lost(self, error: Exception) -> None:
        if self._lost_since is None:
            self._lost_since = self.stats.step
            what = "starting a new one" if self.link.may_start else "snapshots resume when a new one answers"
            log.warning(
                "rank %d: the keeper of this node is gone (%s): memory snapshots up to step %d were lost; the newest "
                "committed checkpoint is step %d; %s",
                self.registration.rank,
                error,
                self.stats.copied,
                self.stats.committed,
                what,
            )
        self._registered = None
        self.stats.copied = -1

    def update_status(self, status: m.Status | None) -> None:
        """Take the keeper's persist and parity status (None: the reply carried none)."""
        if status is None:
            return
        s = self.stats
        s.durable, s.committed, s.protected = status.durable, status.committed, status.protected
        s.parity_bytes, s.protect_cpu_s = status.parity_bytes, status.protect_cpu_s
        s.backlog, s.host_bytes = status.backlog, status.host_bytes
        if status.failed > s.failed:
            s.failed, s.failure = status.failed, status.failure
            log.error("rank %d: the keeper could not persist step %d: %s", self.registration.rank, s.failed, s.failure)


def slot_views(segment: Segment, layout: SlotLayout) -> list[torch.Tensor]:
    """Each tensor's place in a slot, as a tensor of its dtype and local shape sharing the memory."""
    data = torch.from_numpy(segment.array())
    return [data[e.offset : e.offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape) for e in layout.entries]


@dataclass(frozen=True)
class Shares:
    """Where a snapshot's scaled parity shares go (rows 1..m-1 of `recipe`, row after row in `out`)."""

    recipe: ShareRecipe
    out: torch.Tensor  # uint8, the keeper's shares segment
    slot: torch.Tensor  # uint8, the slot the snapshot is copied into
    layout: SlotLayout


class HostCopier:
    """CPU training: copy tensor by tensor in the calling (background) thread; copy_ releases the GIL.
    Shares are scaled from the slot's copy (there is no device to scale them on)."""

    def mark(self) -> None:
        return None

    def copy(
        self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], ready: None, *, shares: Shares | None = None
    ) -> None:
        for d, s in zip(dst, src, strict=True):
            if d.numel():
                d.copy_(s)
        if shares is not None:
            shares.recipe.scale(shares.slot.numpy(), shares.out.numpy())


class CudaCopier:
    """GPU training: device-to-host copies on a side stream, after the optimizer step's kernels."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def mark(self) -> torch.cuda.Event:
        """Recorded in the training thread on its current stream: the copies start after this point."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(
        self,
        dst: Sequence[torch.Tensor],
        src: Sequence[torch.Tensor],
        ready: torch.cuda.Event,
        *,
        shares: Shares | None = None,
    ) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for d, s in zip(dst, src, strict=True):
                if d.numel():
                    d.copy_(s, non_blocking=True)
            if shares is not None:
                scale_on_device(shares, src)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()  # src tensors (eager clones included) stay referenced until here


SCALE_BYTES = 16 * 2**20  # device memory one scaled piece takes per row, on the copy stream


def scale_on_device(shares: Shares, src: Sequence[torch.Tensor]) -> None:
    """Scale the shares from the tensors where they are (the Triton kernel, for CUDA tensors), and
    copy them to host on the current stream: device memory in use stays at one piece per row, freed
    in stream order."""
    recipe, n = shares.recipe, shares.recipe.nbytes
    for entry, tensor in zip(shares.layout.entries, src, strict=True):
        if not entry.nbytes:
            continue
        flat = tensor.contiguous().reshape(-1).view(torch.uint8)
        for start, stop, coefficients in recipe.ranges:
            lo, hi = max(start, entry.offset), min(stop, entry.offset + entry.nbytes)
            for a in range(lo, hi, SCALE_BYTES):
                b = min(a + SCALE_BYTES, hi)
                scaled = erasure.scale(flat[a - entry.offset : b - entry.offset], coefficients)
                for row, piece in enumerate(scaled):
                    shares.out[row * n + a : row * n + b].copy_(piece, non_blocking=True)


class _Background:
    """One daemon thread running snapshot jobs in order (daemon: a hung keeper never blocks exit)."""

    def __init__(self, device: torch.device | None) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], None], Future] | None] = queue.Queue()
        self._device = device
        self._thread = threading.Thread(target=self._run, name="resurgo-snapshot", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.set_device(self._device)  # the current device is per thread
        while (job := self._jobs.get()) is not None:
            fn, future = job
            try:
                fn()
                future.set_result(None)
            except BaseException as e:
                future.set_exception(e)
