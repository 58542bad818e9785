"""The regular chunk grid of a stored tensor: its choice, and which chunks a box touches.

Chunks are aligned to the saving boxes (per dim, the gcd of the interior box boundaries), so each
chunk lies in exactly one box and is written whole by that box's writer, without read-modify-write.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

from .layout import Box

DEFAULT_MAX_CHUNK_BYTES = 4 << 20  # measured: see benchmarks/checkpoint_io.py

ChunkIndex = tuple[int, ...]
_SMALL_FACTOR = 16


def choose_chunks(shape: Sequence[int], boxes: Sequence[Box], *, itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """A chunk shape aligned to every box boundary, with at most `max_bytes` per chunk.

    Within that limit chunks are tiles, not row bands: the longest side is split first, so a later
    topology sharded along any dim reads little more than it needs.
    """
    chunks = []
    for d, n in enumerate(shape):
        g = 0
        for box in boxes:
            for edge in (box.offsets[d], box.stops[d]):
                if 0 < edge < n:
                    g = math.gcd(g, edge)
        chunks.append(max(g or n, 1))
    # Splitting a side by one of its factors keeps the alignment. Sides with a small factor go
    # first (a large prime side would collapse to 1 and make chunks needlessly thin).
    while math.prod(chunks) * itemsize > max_bytes:
        splittable = [(_smallest_factor(c) > _SMALL_FACTOR, -c, d) for d, c in enumerate(chunks) if c > 1]
        if not splittable:
            break
        d = min(splittable)[2]
        chunks[d] //= _smallest_factor(chunks[d])
    return tuple(chunks)


def grid_shape(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-n // c) for n, c in zip(shape, chunks))


def chunk_box(index: ChunkIndex, *, shape: Sequence[int], chunks: Sequence[int]) -> Box:
    """The part of the global tensor a chunk holds (edge chunks are cut at the tensor's end)."""
    offsets = tuple(i * c for i, c in zip(index, chunks))
    return Box(offsets, tuple(min(c, n - o) for o, c, n in zip(offsets, chunks, shape)))


def chunks_in(box: Box, *, chunks: Sequence[int]) -> Iterator[ChunkIndex]:
    """Indices of the chunks overlapping `box`."""
    ranges = [range(o // c, -(-(o + s) // c)) for o, s, c in zip(box.offsets, box.sizes, chunks)]
    return itertools.product(*ranges)


def chunk_key(index: ChunkIndex) -> str:
    """zarr v3's default chunk key ('c/i/j', or 'c' for a 0-d array)."""
    return "/".join(["c", *map(str, index)])


def _smallest_factor(n: int) -> int:
    for f in range(2, math.isqrt(n) + 1):
        if n % f == 0:
            return f
    return n
