"""A slow, obviously-correct GF(2^8) Reed-Solomon in plain Python, written independently of the
kernels (no tables) so the tests compare two derivations of the same code."""

from __future__ import annotations

from collections.abc import Sequence

POLY = 0x11D


def mul(a: int, b: int) -> int:
    """Shift-and-add multiplication, reducing by the field polynomial."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        a <<= 1
        if a & 0x100:
            a ^= POLY
        b >>= 1
    return out


def inv(a: int) -> int:
    """a^254 = a^-1 since the multiplicative group has order 255."""
    out, base, e = 1, a, 254
    while e:
        if e & 1:
            out = mul(out, base)
        base = mul(base, base)
        e >>= 1
    return out


def parity_matrix(k: int, m: int) -> list[list[int]]:
    """Cauchy rows 1/((k+i) ^ j), each column divided by its first entry."""
    rows = [[inv((k + i) ^ j) for j in range(k)] for i in range(m)]
    return [[mul(rows[i][j], inv(rows[0][j])) for j in range(k)] for i in range(m)]


def combine(matrix: Sequence[Sequence[int]], srcs: Sequence[bytes]) -> list[bytes]:
    size = len(srcs[0])
    return [bytes(_dot(row, [s[b] for s in srcs]) for b in range(size)) for row in matrix]


def _dot(row: Sequence[int], column: Sequence[int]) -> int:
    out = 0
    for c, x in zip(row, column):
        out ^= mul(c, x)
    return out


def encode(data: Sequence[bytes], m: int) -> list[bytes]:
    """Parity of data zero-extended to the longest buffer."""
    size = max(len(d) for d in data)
    padded = [d + bytes(size - len(d)) for d in data]
    return combine(parity_matrix(len(data), m), padded)


def invert(matrix: Sequence[Sequence[int]]) -> list[list[int]] | None:
    """Gauss-Jordan over GF(2^8); None when singular."""
    n = len(matrix)
    work = [list(row) + [int(i == j) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if work[r][col]), None)
        if pivot is None:
            return None
        work[col], work[pivot] = work[pivot], work[col]
        scale = inv(work[col][col])
        work[col] = [mul(scale, x) for x in work[col]]
        for r in range(n):
            if r != col and work[r][col]:
                f = work[r][col]
                work[r] = [x ^ mul(f, y) for x, y in zip(work[r], work[col])]
    return [row[n:] for row in work]
