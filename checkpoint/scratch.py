"""Per-thread reusable byte buffers for chunk I/O.

Fresh memory is expensive to fault in (on some VMs a first touch costs ~20x a memcpy), and holding
a rank's whole state in staging buffers doubles its host memory; reusing one buffer per I/O thread
avoids both.
"""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def scratch(nbytes: int, *, slot: int = 0) -> np.ndarray:
    """A uint8 buffer of `nbytes` owned by the calling thread, valid until its next call with `slot`."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = buffers[slot] = np.empty(max(nbytes, 1), dtype=np.uint8)
    return buf[:nbytes]
