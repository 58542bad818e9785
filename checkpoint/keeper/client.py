"""A worker's side of its node's keeper: start one when asked to, reconnect, map its memory.

The keeper is started detached, in its own session, so that killing the workers' process group (as
torchrun does when a worker fails) leaves it and the snapshots it holds alive.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..state.slot_layout import SlotLayout
from . import messages as m
from .prefetch import Prefetched
from .protocol import Client, KeeperError, KeeperGone, call, lock_path, run_id, socket_path
from .shm import Segment

log = logging.getLogger(__name__)

AUTO, EXTERNAL, OFF = "auto", "external", "off"


class KeeperLink:
    """One connection to the keeper of this node, shared by the training thread and the snapshot thread."""

    def __init__(self, *, run_dir: Path, mode: str, local_rank: int, keeper_args: list[str] | None = None) -> None:
        self.run_dir, self.mode, self.local_rank = Path(run_dir), mode, local_rank
        self.keeper_args = list(keeper_args or [])
        self.path = socket_path(run_id(run_dir))
        self.client: Client | None = None
        self.keeper_id: str | None = None
        self.spawned: subprocess.Popen | None = None
        self._maps: dict[str, Segment] = {}

    @property
    def may_start(self) -> bool:
        return self.mode == AUTO and self.local_rank == 0

    def connect(self, *, wait_s: float) -> bool:
        """Connect (local rank 0 in auto mode starts a keeper if none answers); False if none does in time."""
        deadline = time.monotonic() + wait_s
        started = False
        while True:
            try:
                client = Client(self.path)
                hello = client.call(m.Hello())
                break
            except KeeperGone:
                if self.may_start and not started:
                    self.start_keeper()
                    started = True
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
        if self.keeper_id is not None and hello.keeper_id != self.keeper_id:
            self.unmap()  # a new keeper: the old one's memory is gone
        self.client, self.keeper_id = client, hello.keeper_id
        return True

    def start_keeper(self) -> None:
        """Spawn `python -m resurgo.launch.keeper` detached; its output goes to <run dir>/keeper.log."""
        if self.spawned is not None and self.spawned.poll() is None:
            return  # still starting up
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "keeper.log", "ab") as out:
            self.spawned = subprocess.Popen(
                [sys.executable, "-m", "resurgo.launch.keeper", "--run-dir", str(self.run_dir), *self.keeper_args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                close_fds=True,
            )
        log.info("started a keeper (pid %d) for %s", self.spawned.pid, self.run_dir)

    def call(self, request: m.Request) -> Any:
        """The typed reply; KeeperGone (and the connection dropped) when the keeper is gone."""
        return call(self, request)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        if self.client is None:
            raise KeeperGone(f"not connected to a keeper at {self.path}")
        try:
            return self.client.request(op, **fields)
        except KeeperGone:
            self.drop()
            raise

    def drop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    def map(self, names: list[str]) -> list[Segment]:
        """Map the keeper's segments (once each), pinned for DMA where a GPU is in use."""
        out = []
        for name in names:
            if name not in self._maps:
                segment = Segment.attach(name)
                pin_for_dma(segment)
                self._maps[name] = segment
            out.append(self._maps[name])
        return out

    def unmap(self) -> None:
        for segment in self._maps.values():
            unpin_for_dma(segment)
            segment.close()
        self._maps.clear()

    def close(self) -> None:
        self.drop()
        self.unmap()
        if self.spawned is not None:
            self.spawned.poll()  # reap it if it already exited


@dataclass
class _Held:
    """One old rank's step as this node's keeper holds it: the whole slot, or spans prefetched ahead;
    its slot layout and JSON states (None: not held here)."""

    whole: np.ndarray | None = None
    prefetched: list[tuple[Prefetched, np.ndarray]] = field(default_factory=list)
    layout: SlotLayout | None = None
    tree: Any = None
    sums: list[int] | None = None


class HeldSlots:
    """Complete slots this node's keeper holds for any rank, read straight from its shared memory: a
    recovery copies its own node's old ranks without a socket, and the spans of other nodes' old
    ranks its keeper prefetched ahead (`span`), and learns their layouts and JSON states (`described`).
    Each stays pinned and mapped until `close` (mapped apart from the link's own maps, which live as
    long as the worker)."""

    def __init__(self, link: KeeperLink | Client, *, owned: bool = False) -> None:
        self.link, self.owned = link, owned  # an owned link (a connection of its own) closes with it
        self._open: dict[tuple[int, int], _Held] = {}
        self._segments: list[Segment] = []
        self._lock = threading.RLock()  # warm() maps under it what it finds

    def __call__(self, rank: int, step: int) -> np.ndarray | None:
        """Rank `rank`'s slot bytes of `step`, None when this keeper does not hold them whole."""
        return self._find(rank, step).whole

    def warm(self, rank: int) -> None:
        """Map, ahead of new rank `rank`'s restore, the old ranks' slots (or spans prefetched) that it
        will read, as its keeper planned them when prefetching: mapping a segment costs a page-table
        entry per page, work better done while the model is built. Returns once the prefetch finished."""
        with self._lock:  # a restore asking meanwhile waits for these maps rather than racing on the link
            try:
                reads = call(self.link, m.Inventory(compact=True)).reads.get(str(rank))
            except (KeeperGone, KeeperError):
                return
            for old in reads["ranks"] if reads else ():
                self._find(old, reads["step"])

    def span(self, rank: int, step: int, offset: int, nbytes: int) -> np.ndarray | None:
        """Bytes [offset, offset+nbytes) of rank `rank`'s slot of `step`, None unless held or prefetched here."""
        held = self._find(rank, step)
        if held.whole is not None:
            return held.whole[offset : offset + nbytes] if offset + nbytes <= held.whole.size else None
        for piece, data in held.prefetched:
            if (at := piece.find(offset, nbytes)) is not None:
                return data[at : at + nbytes]
        return None

    def described(self, rank: int, step: int) -> tuple[SlotLayout, Any, list[int] | None] | None:
        """Rank `rank`'s slot layout, JSON states and checksums of `step`, when held or prefetched here."""
        held = self._find(rank, step)
        return (held.layout, held.tree, held.sums) if held.layout is not None else None

    def _find(self, rank: int, step: int) -> _Held:
        with self._lock:
            if (rank, step) not in self._open:
                self._open[(rank, step)] = self._map(rank, step)
            return self._open[(rank, step)]

    def _map(self, rank: int, step: int) -> _Held:
        try:
            reply: m.ReadReply = call(self.link, m.Read(rank, step))
        except (KeeperGone, KeeperError):
            return _Held()
        try:
            layout = SlotLayout.from_json(reply.layout)
            if reply.prefetched is not None:
                held = _Held(layout=layout, tree=reply.tree, sums=reply.checksums)
                for piece in reply.prefetched:
                    segment = Segment.attach(piece["segment"])
                    self._segments.append(segment)
                    held.prefetched.append((Prefetched.from_json(rank, step, piece["spans"]), segment.array()))
                return held
            assert reply.segment is not None, "a read reply holds a segment or prefetched pieces"
            segment = Segment.attach(reply.segment)
        except CheckpointError:
            return _Held()
        self._segments.append(segment)
        return _Held(segment.array()[: layout.nbytes], layout=layout, tree=reply.tree, sums=reply.checksums)

    def close_soon(self) -> None:
        """Close, on a thread of its own when this has a connection of its own: unpinning and unmapping
        a restore's worth of memory takes tens of milliseconds that training need not wait for."""
        if self.owned:
            threading.Thread(target=self.close, name="resurgo-release-restore", daemon=True).start()
        else:
            self.close()

    def close(self) -> None:
        with self._lock:
            for (rank, step), held in self._open.items():
                if held.whole is not None or held.prefetched:
                    try:
                        call(self.link, m.Unpin(rank, step))
                    except (KeeperGone, KeeperError):
                        pass
            self._open.clear()
            for segment in self._segments:
                segment.close()  # the mapping goes with the last view into it
            self._segments.clear()
            if self.owned:
                self.link.close()


def pin_for_dma(segment: Segment) -> None:
    """cudaHostRegister the mapping so device-to-host copies into it run asynchronously at full speed."""
    if not segment.size or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    error = torch.cuda.cudart().cudaHostRegister(segment.address, segment.size, 0)
    if int(error) != 0:
        log.warning(
            "cudaHostRegister of %s (%d bytes) failed (error %s): snapshot copies will not overlap compute",
            segment.name,
            segment.size,
            error,
        )


def unpin_for_dma(segment: Segment) -> None:
    if segment.size and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.cudart().cudaHostUnregister(segment.address)


def keeper_pid(run_dir: Path) -> int | None:
    """The pid of the keeper of `run_dir` on this node (from its lock file), None if none runs."""
    try:
        text = lock_path(run_id(run_dir)).read_text().strip()
        pid = int(text)
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None
