"""copy_into copies exactly, for every stored dtype and layout, by torch where it can."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from resurgo.checkpoint import bulk_copy
from resurgo.checkpoint.bulk_copy import copy_into
from resurgo.checkpoint.state.dtypes import _BITS, _NATIVE, storage_dtype

STORED = sorted({str(storage_dtype(name)) for name in [*_NATIVE, *_BITS]})


@pytest.mark.parametrize("dtype", STORED)
def test_every_stored_dtype_is_copied_bit_for_bit(dtype: str) -> None:
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, size=bulk_copy.BULK_BYTES * 2, dtype=np.uint8).view(dtype)
    dst = np.zeros_like(src)
    copy_into(dst, src)
    assert dst.tobytes() == src.tobytes()


def test_strided_regions_and_a_page_aligned_source_a_cache_line_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layouts a restore meets: regions of a larger array, and a mapping 64 bytes behind the target."""
    used = []
    monkeypatch.setattr(bulk_copy.np, "copyto", lambda *a: used.append("numpy"))  # only torch may copy here
    src = np.arange(2048 * 1024, dtype=np.float32).reshape(2048, 1024)
    dst = np.zeros((1024, 2048), dtype=np.float32)
    copy_into(dst[:, ::2], src[::2])
    assert (dst[:, ::2] == src[::2]).all() and (dst[:, 1::2] == 0).all()

    page = mmap.mmap(-1, src.nbytes)
    mapped = np.frombuffer(page, dtype=np.float32).reshape(src.shape)
    mapped[:] = src
    target = np.zeros(src.size + 16, dtype=np.float32)[16:].reshape(src.shape)  # 64 bytes into its page
    copy_into(target, mapped)
    assert (target == src).all() and not used


def test_read_only_reversed_and_small_arrays_fall_back_to_numpy() -> None:
    src = np.arange(bulk_copy.BULK_BYTES, dtype=np.uint8)
    src.flags.writeable = False
    for dst, source in [(np.zeros_like(src), src), (np.zeros_like(src), src[::-1]), (np.zeros(8, np.uint8), src[:8])]:
        copy_into(dst, source)
        assert (dst == source).all()


def test_a_shape_or_dtype_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="copy of float32"):
        copy_into(np.zeros(4, np.float64), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"\[3\]"):
        copy_into(np.zeros(4, np.float32), np.zeros(3, np.float32))
