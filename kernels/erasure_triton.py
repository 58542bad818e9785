"""Triton kernel for Reed-Solomon encode/decode of CUDA buffers: out = coefficients x sources over GF(2^8).

Multiplication works on four bytes per 32-bit word with the "xtime" step (multiply by 2: shift, then
reduce the bytes that overflowed by 0x1d), entirely in registers: no tables to load, and the
powers x*2^b of a source word are shared by every output row. Runs under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK_WORDS = 1024


@triton.jit
def _combine_kernel(
    src_ptr,
    coef_ptr,
    out_ptr,
    n_src,
    n_out,
    n_words,
    src_stride,
    out_stride,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_words
    rows = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK), dtype=tl.uint32)
    for j in range(n_src):
        x = tl.load(src_ptr + j * src_stride + offs, mask=in_range, other=0).to(tl.uint32, bitcast=True)
        coef = tl.load(coef_ptr + rows * n_src + j)
        for b in tl.static_range(8):
            take = ((coef >> b) & 1) != 0
            acc ^= tl.where(take[:, None], x[None, :], 0)
            x = ((x & 0x7F7F7F7F) << 1) ^ (((x >> 7) & 0x01010101) * 0x1D)
    out = out_ptr + rows[:, None] * out_stride + offs[None, :]
    tl.store(out, acc.to(tl.int32, bitcast=True), mask=(rows[:, None] < n_out) & in_range[None, :])


@lru_cache(maxsize=256)
def _coefficients(matrix: bytes, shape: tuple[int, int], device: str) -> torch.Tensor:
    rows, cols = shape
    padded = np.zeros((triton.next_power_of_2(rows), cols), dtype=np.int32)
    padded[:rows] = np.frombuffer(matrix, dtype=np.uint8).reshape(shape)
    return torch.from_numpy(padded).to(device)


def combine_triton(matrix: np.ndarray, src: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = XOR_j matrix[i, j] * src[j] for uint8 tensors src (n, C) and out (r, C), C % 4 == 0."""
    assert src.dtype == out.dtype == torch.uint8 and src.device == out.device
    assert src.is_contiguous() and out.is_contiguous() and src.shape[1] == out.shape[1]
    assert src.shape[1] % 4 == 0 and matrix.shape == (out.shape[0], src.shape[0])
    words = src.shape[1] // 4
    if words == 0:
        return
    matrix = np.ascontiguousarray(matrix, dtype=np.uint8)
    coef = _coefficients(matrix.tobytes(), matrix.shape, str(src.device))
    grid = (triton.cdiv(words, BLOCK_WORDS),)
    _combine_kernel[grid](
        src.view(torch.int32),
        coef,
        out.view(torch.int32),
        src.shape[0],
        out.shape[0],
        words,
        words,
        words,
        ROWS=coef.shape[0],
        BLOCK=BLOCK_WORDS,
    )
