"""One shard file: its chunks back to back, then an index, as zarr v3's `sharding_indexed` codec
lays it out (index at the end: per chunk, C order, little-endian uint64 offset and byte count,
then the index's crc32c).

Chunks of 64 KiB and more start on a page boundary, so a reader maps exactly the ones it needs.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import crc32c
import numpy as np

from .codec import CRC_BYTES, checksum_ok
from .fsio import Buffer

ALIGN = mmap.ALLOCATIONGRANULARITY
_ALIGN_ABOVE = 64 << 10  # smaller chunks are packed: padding would cost more than it saves
_ZEROS = bytes(ALIGN)
_EMPTY = np.uint64(2**64 - 1)  # zarr's marker of a chunk not written


@dataclass(frozen=True)
class ShardShape:
    """How chunks sit in a shard: `per_shard` chunks along each dim."""

    per_shard: tuple[int, ...]

    @staticmethod
    def of(shards: Sequence[int], chunks: Sequence[int]) -> ShardShape:
        return ShardShape(tuple(s // c for s, c in zip(shards, chunks)))

    @property
    def count(self) -> int:
        return math.prod(self.per_shard)

    @property
    def index_nbytes(self) -> int:
        return self.count * 16 + CRC_BYTES

    def locate(self, chunk: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """(shard index, position of the chunk in the shard's index) of a global chunk index."""
        shard = tuple(i // n for i, n in zip(chunk, self.per_shard))
        inner = tuple(i % n for i, n in zip(chunk, self.per_shard))
        return shard, int(np.ravel_multi_index(inner, self.per_shard)) if inner else 0

    def chunks_of(self, shard: Sequence[int]) -> list[tuple[int, ...]]:
        """Global indices of a shard's chunks, in index (C) order."""
        return [
            tuple(s * n + i for s, n, i in zip(shard, self.per_shard, inner)) for inner in np.ndindex(*self.per_shard)
        ]


def shard_buffers(chunks: Iterable[Sequence[Buffer]]) -> Iterator[Sequence[Buffer]]:
    """A shard file as groups of buffers, from each chunk's encoded buffers in index order (drawn
    lazily, so one chunk's scratch memory can be reused by the next once it is written)."""
    entries, offset, nbytes = [], 0, 0
    for parts in chunks:
        pad = -offset % ALIGN if nbytes >= _ALIGN_ABOVE else 0  # chunks of a shard have equal raw sizes
        nbytes = sum(memoryview(p).nbytes for p in parts)
        yield [_ZEROS[:pad], *parts] if pad else parts
        entries.append((offset + pad, nbytes))
        offset += pad + nbytes
    raw = np.array(entries, dtype="<u8").tobytes()
    yield [raw, crc32c.crc32c(raw).to_bytes(CRC_BYTES, "little")]


class IndexProblem(ValueError):
    """The shard's index is unreadable (truncated or corrupted file)."""


def read_index(fd: int, *, size: int, shape: ShardShape) -> np.ndarray:
    """The verified (count, 2) index of an open shard file of `size` bytes."""
    if size < shape.index_nbytes:
        raise IndexProblem(f"is {size} bytes, shorter than its index ({shape.index_nbytes} bytes): truncated")
    raw = os.pread(fd, shape.index_nbytes, size - shape.index_nbytes)
    if len(raw) != shape.index_nbytes or not checksum_ok(memoryview(raw)[:-CRC_BYTES], memoryview(raw)[-CRC_BYTES:]):
        raise IndexProblem("has an index failing its crc32c checksum (truncated or corrupted)")
    index = np.frombuffer(raw[:-CRC_BYTES], dtype="<u8").reshape(shape.count, 2)
    data_end = size - shape.index_nbytes
    for offset, nbytes in index:
        if offset == _EMPTY and nbytes == _EMPTY:
            continue
        if int(offset) + int(nbytes) > data_end:
            raise IndexProblem("has an index pointing past its data (truncated or overwritten)")
    return index


def is_empty(entry: np.ndarray) -> bool:
    return bool(entry[0] == _EMPTY and entry[1] == _EMPTY)
