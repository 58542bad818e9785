"""Memory for chunk I/O without fresh allocations: per-thread reusable buffers, and strided
arrays seen as runs of contiguous bytes for scatter/gather reads and writes.

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


MIN_RUN_BYTES = 4096  # below this, one copy beats many tiny I/O segments


def contiguous_runs(view: np.ndarray) -> list[memoryview] | None:
    """`view`'s bytes as contiguous runs in C order (no copy), None if the runs would be tiny."""
    inner, run = view.ndim, view.itemsize
    while inner > 0 and (view.shape[inner - 1] == 1 or view.strides[inner - 1] == run):
        run *= view.shape[inner - 1]
        inner -= 1
    if inner == 0:
        return [memoryview(view.reshape(-1).view(np.uint8))]
    if run < MIN_RUN_BYTES:
        return None
    return [memoryview(view[idx].reshape(-1).view(np.uint8)) for idx in np.ndindex(view.shape[:inner])]
