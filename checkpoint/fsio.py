"""Durable file operations: a save is only as good as the fsyncs under its COMMITTED marker."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def write_buffers(path: Path, buffers: Sequence[bytes | memoryview], *, sync: bool = True) -> int:
    """Create `path` from `buffers` (no concatenation copy), fsync it, return the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        total, want = 0, sum(memoryview(b).nbytes for b in buffers)
        views = [memoryview(b).cast("B") for b in buffers]
        while views:
            n = os.writev(fd, views)
            total += n
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if views:
                views[0] = views[0][n:]
        assert total == want
        if sync:
            os.fsync(fd)
        return total
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    write_buffers(path, [data])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, *, files: Sequence[str] = ()) -> None:
    """fsync every folder under `root` (their entries), and the files whose names are in `files`."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name in files:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))
