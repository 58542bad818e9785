"""Per-node ownership of a run's keeper resources: one lock file per run, and reclaiming the
shared memory and sockets of runs whose keeper died (a SIGKILLed keeper cleans up nothing)."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from . import shm
from .keeper_protocol import segment_prefix, socket_dir

log = logging.getLogger(__name__)


def reclaim_stale(*, own: str) -> int:
    """Remove segments and sockets of runs whose keeper is dead (this run's: always, we hold its lock)."""
    reclaimed, nbytes = 0, 0
    directory = socket_dir()
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
    if reclaimed:
        log.warning("reclaimed %d shared memory segments (%.2f GiB) of dead keepers: the memory snapshots they held are lost",
                    reclaimed, nbytes / 2**30)  # fmt: skip
    return reclaimed


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
