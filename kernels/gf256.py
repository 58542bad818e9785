"""GF(2^8) arithmetic and the numpy path for combining byte buffers with a matrix of field elements.

The field uses the polynomial x^8+x^4+x^3+x^2+1 (0x11d), the one ISA-L and most Reed-Solomon codecs use,
so every backend (ISA-L, numpy, Triton) computes the very same bytes and parity made on one machine
decodes on any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

POLY = 0x11D


def _exp_log() -> tuple[np.ndarray, np.ndarray]:
    exp = np.zeros(512, dtype=np.uint8)
    log = np.zeros(256, dtype=np.int32)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    exp[255:510] = exp[:255]
    return exp, log


EXP, LOG = _exp_log()


def _mul_table() -> np.ndarray:
    a = np.arange(256)
    table = EXP[(LOG[a][:, None] + LOG[a][None, :]) % 255].copy()
    table[0, :] = 0
    table[:, 0] = 0
    return table


MUL = _mul_table()
"""MUL[a, b] = a*b; row MUL[c] is the 256-entry lookup table of multiplication by c."""


def mul(a: int, b: int) -> int:
    return int(MUL[a, b])


def inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(EXP[255 - LOG[a]])


def mat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product over GF(2^8) (small matrices: coefficient algebra, not data)."""
    prod = MUL[a[:, :, None], b[None, :, :]]
    return np.bitwise_xor.reduce(prod, axis=1).astype(np.uint8)


def mat_inv(a: np.ndarray) -> np.ndarray:
    """Inverse over GF(2^8) by Gauss-Jordan; a singular matrix means the code is not MDS (a bug)."""
    n = a.shape[0]
    work = np.concatenate([a.astype(np.uint8), np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        pivots = np.nonzero(work[col:, col])[0]
        assert pivots.size, "singular matrix over GF(2^8)"
        p = col + int(pivots[0])
        work[[col, p]] = work[[p, col]]
        work[col] = MUL[inv(int(work[col, col])), work[col]]
        factors = work[:, col].copy()
        factors[col] = 0
        work ^= MUL[factors[:, None], work[col][None, :]]
    return work[:, n:].copy()


@lru_cache(maxsize=None)
def cauchy_parity(k: int, m: int) -> np.ndarray:
    """The m x k parity rows of the systematic generator.

    A Cauchy matrix 1/(x_i + y_j) with distinct x_i = k+i, y_j = j has every square submatrix
    invertible, which is exactly "any k of the k+m buffers rebuild the rest". Dividing each column by
    its first entry keeps that property and makes parity 0 the plain XOR of the data.
    """
    rows = np.array([[inv((k + i) ^ j) for j in range(k)] for i in range(m)], dtype=np.uint8)
    scale = np.array([inv(int(c)) for c in rows[0]], dtype=np.uint8)
    out = MUL[rows, scale[None, :]]
    out.setflags(write=False)
    return out


def generator(k: int, m: int) -> np.ndarray:
    """The (k+m) x k generator: identity (data is stored as is) over the parity rows."""
    return np.concatenate([np.eye(k, dtype=np.uint8), cauchy_parity(k, m)], axis=0)


def _xor_into(dst: np.ndarray, src: np.ndarray, *, first: bool) -> None:
    if first:
        np.copyto(dst, src)
    else:
        np.bitwise_xor(dst, src, out=dst)


def _words(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bulk as uint64 (XOR at full vector width) and the odd tail as bytes."""
    bulk = buf.size // 8 * 8
    return buf[:bulk].view(np.uint64), buf[bulk:]


def combine_numpy(matrix: np.ndarray, srcs: Sequence[np.ndarray], dsts: Sequence[np.ndarray]) -> None:
    """dsts[i] = XOR_j matrix[i, j] * srcs[j], for equal-length flat uint8 arrays.

    Coefficient 1 is a plain XOR on 64-bit words; any other is a 256-entry table lookup (np.take
    releases the GIL, so chunks run in parallel threads).
    """
    assert matrix.shape == (len(dsts), len(srcs))
    scratch = np.empty_like(srcs[0]) if np.any(matrix > 1) else None
    for i, dst in enumerate(dsts):
        first = True
        for j, src in enumerate(srcs):
            c = int(matrix[i, j])
            if c == 0:
                continue
            if c != 1:
                assert scratch is not None
                np.take(MUL[c], src, out=scratch)
                src = scratch
            for d, s in zip(_words(dst), _words(src)):
                _xor_into(d, s, first=first)
            first = False
        if first:
            dst.fill(0)
