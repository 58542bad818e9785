"""The parity a holder sums from its peers' shares (`ParityBuffer`), and the pacing of the shares a
node sends (`Pace`): the value types of the parity service."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import code as erasure

PIECE_BYTES = 4 * 2**20  # per message: bounds the memory a holder spends on one incoming piece


@dataclass
class ParityBuffer:
    """One parity buffer being summed from its k shares, piece by piece (every sender cuts its share
    at the same PIECE_BYTES grid). The first piece to reach a grid cell is stored, scaled, and the
    rest of the cell cleared; later ones are added. So the buffer is never zero-filled first, and
    the first share costs a copy, not a read-modify-write."""

    data: np.ndarray  # its bytes are garbage outside the cells in `filled`
    filled: set[int] = field(default_factory=set)  # offsets of the grid cells written so far
    lengths: dict[int, int] = field(default_factory=dict)  # data index -> its segment length
    received: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def complete(self, k: int) -> bool:
        return len(self.lengths) == k and all(self.received.get(t, 0) == n for t, n in self.lengths.items())

    def add(self, offset: int, piece: np.ndarray, *, k: int, m: int, parity: int, index: int) -> None:
        """Add data buffer `index`'s share piece at `offset` (a grid cell's start)."""
        if offset % PIECE_BYTES or piece.size > PIECE_BYTES:
            raise ValueError(f"a {piece.size}-byte share piece at offset {offset} is off the {PIECE_BYTES}-byte grid")
        first = offset not in self.filled
        if piece.size:
            erasure.accumulate(self.data[offset:], piece, k=k, m=m, parity=parity, index=index, store=first)
        if first:
            self.data[offset + piece.size : offset + PIECE_BYTES] = 0  # past a shorter share's end
            self.filled.add(offset)

    def grow(self, length: int) -> None:
        """Extend to a longer segment than the first one seen; what no share has reached reads as zero."""
        if length <= self.data.size:
            return
        grown = np.zeros(length, dtype=np.uint8)
        grown[: self.data.size] = self.data
        self.data = grown


class Pace:
    """Spaces sends so that they average at most a given rate: each waits until the one before it
    would have taken its share of the time at that rate."""

    def __init__(self) -> None:
        self.due = 0.0

    def wait(self, nbytes: int, *, bytes_per_s: float) -> None:
        if bytes_per_s <= 0:
            return
        now = time.monotonic()
        if self.due > now:
            time.sleep(self.due - now)
            now = self.due
        self.due = now + nbytes / bytes_per_s
