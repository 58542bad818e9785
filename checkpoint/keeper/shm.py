"""POSIX shared memory segments that outlive the processes that map them.

The keeper creates each segment (mode 0600, so only this user can map it) and workers map it by
name. On Linux a POSIX shared memory object is a file in /dev/shm, so plain `os` and `mmap` calls
suffice; unlike `multiprocessing.shared_memory`, nothing registers the segment with a resource
tracker that would unlink it when a worker exits. Names carry the run id, so a new keeper can find
and reclaim what a dead one left behind.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

SHM_DIR = Path(os.environ.get("RESURGO_SHM_DIR", "/dev/shm"))
PREFIX = "resurgo."
_NAME = re.compile(r"resurgo\.[A-Za-z0-9_.-]{1,200}")


@dataclass
class Segment:
    """One mapped shared memory segment; `array()` views its bytes without copying."""

    name: str
    size: int
    _map: mmap.mmap = field(repr=False)

    @staticmethod
    def create(name: str, size: int) -> Segment:
        """A new zero-filled segment whose memory is reserved now (no SIGBUS on a full /dev/shm later)."""
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise CheckpointError(
                f"shared memory segment {name} already exists: another keeper of this run is alive"
            ) from None
        try:
            os.fchmod(fd, 0o600)  # the umask cannot loosen it, but be explicit
            if size:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    os.unlink(path)
                    if e.errno in (errno.ENOSPC, errno.ENOMEM):
                        free = shm_free_bytes()
                        raise CheckpointError(
                            f"{SHM_DIR} has {free / 2**30:.2f} GiB free but a snapshot buffer needs {size / 2**30:.2f} GiB: "
                            "enlarge it (e.g. docker --shm-size), lower checkpoint.host_memory_gb, or set fault.keeper=off"
                        ) from None
                    raise
            return Segment(name, size, _mmap(fd, size))
        finally:
            os.close(fd)

    @staticmethod
    def attach(name: str) -> Segment:
        """Map an existing segment, refusing one another user could have written."""
        try:
            fd = os.open(_path(name), os.O_RDWR)
        except FileNotFoundError:
            raise CheckpointError(f"shared memory segment {name} is gone: its keeper exited") from None
        try:
            info = os.fstat(fd)
            if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise CheckpointError(
                    f"shared memory segment {name} is owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}: "
                    "refusing to use memory other users can write; remove it and restart the keeper"
                )
            return Segment(name, info.st_size, _mmap(fd, info.st_size))
        finally:
            os.close(fd)

    @property
    def address(self) -> int:
        """The mapping's virtual address (for cudaHostRegister)."""
        return np.frombuffer(self._map, dtype=np.uint8).ctypes.data if self.size else 0

    def array(self) -> np.ndarray:
        """All bytes of the segment as a writable uint8 array sharing the mapping."""
        return np.frombuffer(self._map, dtype=np.uint8) if self.size else np.zeros(0, dtype=np.uint8)

    def close(self) -> None:
        """Unmap if no view is alive; otherwise the mapping goes with the last view."""
        try:
            self._map.close()
        except BufferError:
            pass


def unlink(name: str) -> bool:
    """Remove a segment's name (mappings stay valid until unmapped); False if it did not exist."""
    try:
        os.unlink(_path(name))
        return True
    except FileNotFoundError:
        return False


def list_segments(prefix: str = PREFIX) -> list[tuple[str, int]]:
    """(name, bytes) of this user's segments whose names start with `prefix`."""
    found = []
    try:
        entries = list(os.scandir(SHM_DIR))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith(prefix):
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if info.st_uid == os.getuid() and stat.S_ISREG(info.st_mode):
                found.append((entry.name, info.st_size))
    return sorted(found)


def shm_free_bytes() -> int:
    info = os.statvfs(SHM_DIR)
    return info.f_bavail * info.f_frsize


def _path(name: str) -> Path:
    if not _NAME.fullmatch(name) or ".." in name:
        raise CheckpointError(f"invalid shared memory segment name {name!r}")
    return SHM_DIR / name


def _mmap(fd: int, size: int) -> mmap.mmap:
    if size == 0:
        return mmap.mmap(-1, 1)
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # map every page now, not on first touch
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
