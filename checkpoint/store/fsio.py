"""Durable file operations: a save is only as good as the fsyncs under its COMMITTED marker."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

Buffer = bytes | bytearray | memoryview

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


@contextmanager
def open_for_write(path: Path) -> Iterator[int]:
    """A new (or truncated) file's descriptor, closed after the block."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def write_all(fd: int, buffers: Sequence[Buffer]) -> int:
    """Append `buffers` to `fd` without concatenating them; the bytes written."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = 0
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        total += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def write_buffers(path: Path, buffers: Iterable[Buffer | Sequence[Buffer]], *, sync: bool = True) -> int:
    """Create `path` from `buffers` (or groups of them, each written before the next is drawn,
    so a lazy producer may reuse its memory), fsync it unless told not to; the bytes written.

    Every file of a checkpoint is written here.
    """
    with open_for_write(path) as fd:
        total = sum(write_all(fd, item if isinstance(item, (list, tuple)) else [item]) for item in buffers)
        if sync:
            os.fsync(fd)
    return total


def write_file(path: Path, data: bytes) -> None:
    write_buffers(path, [data])


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, out: Path, *, token: str) -> None:
    """Put the finished folder `tmp` at `out`; an older `out` stays as it was if the rename fails.
    `token` names the older one's temporary place beside it (removed once `tmp` is in)."""
    old = out.parent / f".{out.name}.old-{token}"
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old.exists():
            old.rename(out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


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
                fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))
