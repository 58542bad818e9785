"""Per-node ownership of a run's keeper resources: one lock file per run, and reclaiming the
shared memory and sockets of runs whose keeper died (a SIGKILLed keeper cleans up nothing).

Two ways find a dead keeper's memory: its run's lock file, free, in this keeper folder; and, for
any run and any keeper folder (nodes simulated on one machine each have their own), the keeper's
pid in each segment's name, no longer running."""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..process import process_alive
from . import shm
from .protocol import segment_owner, segment_prefix, socket_dir

log = logging.getLogger(__name__)


def reclaim_stale(*, own: str = "", directory: Path | None = None) -> int:
    """Remove segments and sockets of runs whose keeper is dead (run `own`'s: always, we hold its
    lock), in the keepers' folder `directory` (this user's by default)."""
    reclaimed, nbytes = 0, 0
    directory = directory or socket_dir()
    for lock in directory.glob("*.lock"):
        rid = lock.name.removesuffix(".lock")
        fd = None if rid == own else try_lock(lock)
        if rid != own and fd is None:
            continue  # that run's keeper is alive
        try:
            for name, size in shm.list_segments(segment_prefix(rid)):
                reclaimed += shm.unlink(name)
                nbytes += size
            if rid != own:
                (directory / f"{rid}.sock").unlink(missing_ok=True)
                lock.unlink(missing_ok=True)  # still holding it: see try_lock
        finally:
            if fd is not None:
                os.close(fd)
    for name, size in shm.list_segments(shm.PREFIX):
        owner = segment_owner(name)
        if owner is not None and not process_alive(owner):
            reclaimed += shm.unlink(name)
            nbytes += size
    if reclaimed:
        log.warning(
            "reclaimed %d shared memory segments (%.2f GiB) of dead keepers: the memory snapshots they held are lost",
            reclaimed,
            nbytes / 2**30,
        )
    return reclaimed


@dataclass(frozen=True)
class NodeKeeper:
    """A keeper of this node as its lock file and segments show it (for `resurgo-keeper list`)."""

    run: str  # the run id
    pid: int | None
    alive: bool
    segments: int
    nbytes: int


def node_keepers() -> list[NodeKeeper]:
    """Every keeper this node shows a trace of: a lock file in this keeper folder, or shared memory
    (of any keeper folder) named with its pid; dead ones too, until reclaimed."""
    found: dict[tuple[str, int | None], list[int]] = {}
    for lock in socket_dir().glob("*.lock"):
        try:
            pid = int(lock.read_text().strip() or 0) or None
        except (OSError, ValueError):
            pid = None
        found.setdefault((lock.name.removesuffix(".lock"), pid), [])
    for name, size in shm.list_segments(shm.PREFIX):
        run = name.removeprefix(shm.PREFIX).split(".", 1)[0]
        found.setdefault((run, segment_owner(name)), []).append(size)
    return [
        NodeKeeper(run, pid, pid is not None and process_alive(pid), len(sizes), sum(sizes))
        for (run, pid), sizes in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
    ]


def try_lock(path: Path) -> int | None:
    """An exclusive lock on `path` (fd), None if a live process holds it.

    Lock files are removed by their holder, so a lock won on a file that was unlinked meanwhile is
    worthless: retry until the locked file is the one at `path`.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
