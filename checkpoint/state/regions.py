"""The one resharding geometry: where a region of a global tensor lies in a rank's local data, what
two ranks' pieces share, and which row-major runs of bytes hold a region.

A fragment's pieces are (global box, slices in the local data) pairs (`layout.pieces`). Restoring
from the store intersects a target's pieces with stored chunks (`store.save_plan.chunk_reads`);
restoring from peers' memory intersects them with the old ranks' pieces (`erasure.reshard`): both
place the overlap with `place`, so disk, memory and peers reshard the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

from .layout import Box

Region = tuple[slice, ...]
Piece = tuple[Box, Region]  # a global box and where it lies in some local data


def place(local: Region, box: Box, inner: Box) -> Region:
    """Where `inner` (inside `box`) lies in the local data that holds `box` at `local`."""
    return tuple(
        slice(l.start + o - b, l.start + o - b + s)
        for l, o, b, s in zip(local, inner.offsets, box.offsets, inner.sizes)
    )


def overlaps(wanted: Iterable[Piece], held: Sequence[Piece]) -> Iterator[tuple[Box, Region, Region]]:
    """(overlap, where it goes in the wanted local data, where it lies in the held local data) for
    every pair of a wanted and a held piece that share elements."""
    for wbox, wlocal in wanted:
        for hbox, hlocal in held:
            inter = wbox.intersect(hbox)
            if inter is not None:
                yield inter, place(wlocal, wbox, inter), place(hlocal, hbox, inter)


def flat_index(index: Sequence[int], shape: Sequence[int]) -> int:
    """The row-major position of `index` in `shape` (numpy's ravel_multi_index costs more than a copy's planning)."""
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


def run_of(shape: Sequence[int], region: Region) -> tuple[int, int] | None:
    """[first, last) element of `region` in row-major order when it is one contiguous run, else None."""
    if not shape:
        return (0, 1)
    sizes = [s.stop - s.start for s in region]
    split = next((d for d, n in enumerate(sizes) if n > 1), len(shape) - 1)
    if any(sizes[d] != shape[d] for d in range(split + 1, len(shape))):
        return None  # a run needs single indices before one dim and whole dims after it
    first = flat_index([s.start for s in region], shape)
    return first, first + math.prod(sizes)


def covering_run(shape: Sequence[int], regions: Iterable[Region]) -> tuple[int, int]:
    """[first, last) element, in row-major order, of the one run that covers every region."""
    if not shape:
        return 0, 1
    regions = list(regions)
    first = min(flat_index([s.start for s in r], shape) for r in regions)
    last = max(flat_index([s.stop - 1 for s in r], shape) for r in regions) + 1
    return first, last
