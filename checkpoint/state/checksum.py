"""Checksums of a snapshot slot, so that no restore takes a flipped bit for state.

The disk store checks a crc32c per chunk; a slot in a keeper's shared memory, a copy fetched from a
peer and a rank decoded from parity are checked the same way: the worker that copies a snapshot
computes, on its background thread, a crc32c per piece of the slot (each tensor's bytes, cut every
PIECE_BYTES from the tensor's start), and every restore verifies the pieces it reads before any
training tensor takes them. Pieces follow tensors, so a restore that reads part of one tensor reads
at most a piece more at each end, and a small tensor is one piece.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import crc32c
import numpy as np

from ..errors import CheckpointError
from ..state.slot_layout import SlotLayout

PIECE_BYTES = 4 * 2**20


class ChecksumMismatch(CheckpointError):
    """Snapshot bytes differ from what their worker copied: the memory or the wire corrupted them."""


_PIECES: dict[str, list[tuple[int, int, str]]] = {}  # layout digest -> its pieces (a run has few layouts)


def pieces(layout: SlotLayout) -> list[tuple[int, int, str]]:
    """(offset, bytes, tensor name) of every checked piece of a slot laid out as `layout`, in slot order."""
    found = _PIECES.get(layout.digest)
    if found is None:
        found = _PIECES[layout.digest] = [
            (e.offset + a, min(PIECE_BYTES, e.nbytes - a), e.name)
            for e in sorted(layout.entries, key=lambda e: e.offset)
            for a in range(0, e.nbytes, PIECE_BYTES)
        ]
    return found


def checksums(slot: np.ndarray, layout: SlotLayout) -> list[int]:
    """The crc32c of every piece of `slot` (its uint8 bytes); crc32c releases the GIL."""
    return [crc32c.crc32c(slot[a : a + n]) for a, n, _ in pieces(layout)]


def verify(slot: np.ndarray, layout: SlotLayout, sums: Sequence[int], *, what: str) -> None:
    """Raise ChecksumMismatch naming the tensors of `slot` whose bytes differ from `sums`."""
    bad = sorted(
        {name for (a, n, name), s in zip(pieces(layout), sums, strict=True) if crc32c.crc32c(slot[a : a + n]) != s}
    )
    if bad:
        raise ChecksumMismatch(
            f"{what}: checksum mismatch in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: "
            "the memory holding it or the network corrupted it"
        )


def covering(layout: SlotLayout, offset: int, nbytes: int) -> tuple[int, int, list[int]]:
    """The byte range [start, stop) of the whole pieces that overlap [offset, offset+nbytes), and their
    indices (padding between tensors is in no piece: the range may not reach the span's ends there)."""
    every = pieces(layout)
    i = max(bisect.bisect_right(every, (offset, float("inf"))) - 1, 0)
    found = []
    while i < len(every) and every[i][0] < offset + nbytes:
        if offset < every[i][0] + every[i][1]:
            found.append(i)
        i += 1
    if not found:
        return offset, offset + nbytes, []
    return every[found[0]][0], every[found[-1]][0] + every[found[-1]][1], found
