"""GF(2^8) arithmetic and the numpy path for combining byte buffers with a matrix of field elements.

The field uses the polynomial x^8+x^4+x^3+x^2+1 (0x11d), the one ISA-L and most Reed-Solomon codecs use,
so every backend (ISA-L, numpy, Triton) computes the very same bytes and parity made on one machine
decodes on any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, lru_cache

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


@cache
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


def _words(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bulk as uint64 (XOR at full vector width) and the odd tail as bytes."""
    bulk = buf.size // 8 * 8
    return buf[:bulk].view(np.uint64), buf[bulk:]


def _xor(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    for x, y, o in zip(_words(a), _words(b), _words(out)):
        np.bitwise_xor(x, y, out=o)


@lru_cache(maxsize=64)
def _pair_table(c: int) -> np.ndarray:
    """Products of c with both bytes of a little-endian uint16: half as many lookups as bytes."""
    row = MUL[c].astype(np.uint16)
    return (row[None, :] | (row[:, None] << 8)).reshape(-1)


PAIR_TABLE_MIN_BYTES = 65536
"""Below this, building a 128 KiB pair table costs more than the lookups it saves."""


def _lookup(c: int, src: np.ndarray, out: np.ndarray) -> None:
    pairs = src.size // 2 * 2 if src.size >= PAIR_TABLE_MIN_BYTES else 0
    if pairs:
        np.take(_pair_table(c), src[:pairs].view(np.uint16), out=out[:pairs].view(np.uint16))
    np.take(MUL[c], src[pairs:], out=out[pairs:])


def combine_numpy(matrix: np.ndarray, srcs: Sequence[np.ndarray], dsts: Sequence[np.ndarray]) -> None:
    """dsts[i] = XOR_j matrix[i, j] * srcs[j], for equal-length flat uint8 arrays.

    Coefficient 1 is a plain XOR on 64-bit words; any other a table lookup on byte pairs (np.take
    releases the GIL, so chunks can run in parallel threads). The first two terms XOR straight
    into dst, saving a copy.
    """
    assert matrix.shape == (len(dsts), len(srcs))
    scratch = np.empty_like(srcs[0]) if np.any(matrix > 1) else None
    for row, dst in zip(matrix, dsts):
        held: np.ndarray | None = None
        filled = False
        for c, src in zip(row.tolist(), srcs):
            if c == 0:
                continue
            if c != 1:
                assert scratch is not None
                target = dst if not (filled or held is not None) else scratch
                _lookup(c, src, target)
                if target is dst:
                    filled = True
                    continue
                src = scratch
            if filled:
                _xor(dst, src, dst)
            elif held is not None:
                _xor(held, src, dst)
                filled, held = True, None
            else:
                held = src
        if held is not None:
            np.copyto(dst, held)
        elif not filled:
            dst.fill(0)
