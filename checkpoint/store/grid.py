"""The chunk grid of a stored tensor: shards (one file each) split into chunks (checksummed units).

Shards are aligned to the saving boxes (per dim, the gcd of the interior box boundaries), so each
shard lies in exactly one box and is written whole, as one file, by that box's writer. Chunks are
tiles of a shard, the unit a loading rank reads and verifies; tiles (not row bands) keep a later
topology sharded along any dim from reading much more than it needs. This is zarr v3's
`sharding_indexed` codec: the regular chunk grid is the shard grid, the inner chunks are ours.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

from ..state.layout import Box

DEFAULT_MAX_CHUNK_BYTES = 4 << 20  # measured: see benchmarks/checkpoint_io.py
DEFAULT_MAX_SHARD_BYTES = 256 << 20

ChunkIndex = tuple[int, ...]
_SMALL_FACTOR = 16


def choose_grid(
    shape: Sequence[int],
    boxes: Sequence[Box],
    *,
    itemsize: int,
    max_chunk_bytes: int,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shard shape, chunk shape): shards aligned to every box boundary, chunks tiling shards."""
    shards = tile(aligned_block(shape, boxes), itemsize=itemsize, max_bytes=max(max_shard_bytes, max_chunk_bytes))
    return shards, tile(shards, itemsize=itemsize, max_bytes=max_chunk_bytes)


def aligned_block(shape: Sequence[int], boxes: Sequence[Box]) -> tuple[int, ...]:
    """The largest block shape whose grid has a boundary at every box boundary."""
    block = []
    for d, n in enumerate(shape):
        g = 0
        for box in boxes:
            for edge in (box.offsets[d], box.stops[d]):
                if 0 < edge < n:
                    g = math.gcd(g, edge)
        block.append(max(g or n, 1))
    return tuple(block)


def tile(block: Sequence[int], *, itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """`block` divided (by factors, so grids stay aligned) until at most `max_bytes`, longest side first.

    Sides with a small factor go first: a large prime side would collapse to 1 and make thin slivers.
    """
    out = list(block)
    while math.prod(out) * itemsize > max_bytes:
        splittable = [(_smallest_factor(c) > _SMALL_FACTOR, -c, d) for d, c in enumerate(out) if c > 1]
        if not splittable:
            break
        d = min(splittable)[2]
        out[d] //= _smallest_factor(out[d])
    return tuple(out)


def grid_shape(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-n // c) for n, c in zip(shape, chunks))


def chunk_box(index: ChunkIndex, *, shape: Sequence[int], chunks: Sequence[int]) -> Box:
    """The part of the global tensor a chunk (or shard) holds, cut at the tensor's end."""
    offsets = tuple(i * c for i, c in zip(index, chunks))
    return Box(offsets, tuple(max(0, min(c, n - o)) for o, c, n in zip(offsets, chunks, shape)))


def chunks_in(box: Box, *, chunks: Sequence[int]) -> Iterator[ChunkIndex]:
    """Indices of the chunks (or shards) overlapping `box`."""
    ranges = [range(o // c, -(-(o + s) // c)) for o, s, c in zip(box.offsets, box.sizes, chunks)]
    return itertools.product(*ranges)


def chunk_key(index: ChunkIndex) -> str:
    """zarr v3's default key of a shard file ('c/i/j', or 'c' for a 0-d array)."""
    return "/".join(["c", *map(str, index)])


def _smallest_factor(n: int) -> int:
    for f in range(2, math.isqrt(n) + 1):
        if n % f == 0:
            return f
    return n
