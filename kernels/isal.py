"""ISA-L's SIMD Reed-Solomon kernel (ec_encode_data), called in place on numpy buffers.

ISA-L computes over the same field (0x11d) with any coefficient matrix, so it is a drop-in
replacement for the numpy table lookups, several times faster. It is found in the library that the
pyeclib wheel bundles, or a system libisal. Calling it through ctypes passes pointers to the caller's
buffers (no copies, unlike pyeclib's fragment API) and releases the GIL, so chunks run in parallel.
A loaded library must reproduce the numpy path on a probe before it is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from resurgo.kernels.gf256 import combine_numpy


def _candidates() -> list[str]:
    paths: list[str] = []
    spec = importlib.util.find_spec("pyeclib")
    if spec is not None and spec.origin is not None:
        libs = Path(spec.origin).parent.parent / "pyeclib.libs"
        paths += sorted(str(p) for p in libs.glob("libisal*.so*"))
    system = ctypes.util.find_library("isal")
    if system is not None:
        paths.append(system)
    return paths


class IsaL:
    """A loaded libisal; combine() has the contract of gf256.combine_numpy."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.ec_init_tables.restype = None
        lib.ec_encode_data.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
        lib.ec_encode_data.restype = None
        self._mad = getattr(lib, "gf_vect_mad", None)
        if self._mad is not None:
            self._mad.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
            self._mad.restype = None

    @lru_cache(maxsize=256)
    def _tables(self, rows: int, cols: int, coefficients: bytes) -> np.ndarray:
        tables = np.empty(32 * rows * cols, dtype=np.uint8)
        matrix = np.frombuffer(coefficients, dtype=np.uint8)
        self._lib.ec_init_tables(cols, rows, matrix.ctypes.data, tables.ctypes.data)
        return tables

    def combine(self, matrix: np.ndarray, srcs: Sequence[np.ndarray], dsts: Sequence[np.ndarray]) -> None:
        rows, cols = matrix.shape
        assert rows == len(dsts) and cols == len(srcs)
        size = srcs[0].size
        if size == 0:
            return
        tables = self._tables(rows, cols, np.ascontiguousarray(matrix, dtype=np.uint8).tobytes())
        src_ptrs = (ctypes.c_void_p * cols)(*(s.ctypes.data for s in srcs))
        dst_ptrs = (ctypes.c_void_p * rows)(*(d.ctypes.data for d in dsts))
        self._lib.ec_encode_data(size, cols, rows, tables.ctypes.data, src_ptrs, dst_ptrs)

    def multiply_add(self, coefficient: int, src: np.ndarray, dst: np.ndarray) -> bool:
        """dst ^= coefficient * src in one pass (a parity holder adding a share); False when this
        library lacks gf_vect_mad, or for fewer than the 64 bytes its SIMD versions need."""
        if self._mad is None or src.size < 64:
            return False
        assert src.size == dst.size and src.flags.c_contiguous and dst.flags.c_contiguous
        if src.size:
            tables = self._tables(1, 1, bytes([coefficient]))
            self._mad(src.size, 1, 0, tables.ctypes.data, src.ctypes.data, dst.ctypes.data)
        return True


def _agrees(isal: IsaL) -> bool:
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 256, size=(3, 5), dtype=np.uint8)
    for size in (1, 31, 100, 4099):
        srcs = [rng.integers(0, 256, size=size, dtype=np.uint8) for _ in range(5)]
        got = [np.empty(size, dtype=np.uint8) for _ in range(3)]
        want = [np.empty(size, dtype=np.uint8) for _ in range(3)]
        isal.combine(matrix, srcs, got)
        combine_numpy(matrix, srcs, want)
        if not all(np.array_equal(g, w) for g, w in zip(got, want)):
            return False
        acc = srcs[1].copy()
        if isal.multiply_add(int(matrix[0, 0]), srcs[0], acc):
            combine_numpy(np.array([[matrix[0, 0], 1]], dtype=np.uint8), srcs[:2], want[:1])
            if not np.array_equal(acc, want[0]):
                isal._mad = None  # the multiply-accumulate is not trusted; combine still is
    return True


@lru_cache(maxsize=1)
def load() -> IsaL | None:
    """The first libisal that loads and agrees with the numpy path, or None."""
    for path in _candidates():
        try:
            isal = IsaL(ctypes.CDLL(path))
        except (OSError, AttributeError):
            continue
        if _agrees(isal):
            return isal
    return None
