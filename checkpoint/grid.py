"""The regular chunk grid of a stored tensor: its choice, and which chunks a box touches.

Chunks are aligned to the saving boxes (per dim, the gcd of the interior box boundaries), so each
chunk lies in exactly one box and is written whole by that box's writer, without read-modify-write.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

from .layout import Box

DEFAULT_MAX_CHUNK_BYTES = 64 << 20

ChunkIndex = tuple[int, ...]


def choose_chunks(shape: Sequence[int], boxes: Sequence[Box], *, itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """The largest chunk shape aligned to every box boundary with at most `max_bytes` per chunk."""
    chunks = []
    for d, n in enumerate(shape):
        g = 0
        for box in boxes:
            for edge in (box.offsets[d], box.stops[d]):
                if 0 < edge < n:
                    g = math.gcd(g, edge)
        chunks.append(max(g or n, 1))
    # Only divisors keep the alignment; shrink leading dims first so chunks stay contiguous rows.
    for d in range(len(chunks)):
        nbytes = math.prod(chunks) * itemsize
        if nbytes <= max_bytes:
            break
        target = max(1, chunks[d] * max_bytes // nbytes)
        chunks[d] = _largest_divisor_at_most(chunks[d], target)
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


def _largest_divisor_at_most(n: int, limit: int) -> int:
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for q in (d, n // d):
                if best < q <= limit:
                    best = q
    return best
