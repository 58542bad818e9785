"""Erasure codec: agreement with the plain-Python reference, MDS (every erasure pattern), input checks."""

from __future__ import annotations

import itertools

import gf256_reference as ref
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resurgo.checkpoint.erasure import code as erasure
from resurgo.checkpoint.erasure.code import Stripe, as_bytes, decode, encode
from resurgo.kernels import gf256, isal

BACKENDS = ["auto", "numpy"] + (["isal"] if isal.load() is not None else [])


def _all_buffers(data: list[np.ndarray], m: int, **kw: object) -> tuple[Stripe, list[np.ndarray]]:
    group = encode(data, m=m, pad=True, **kw)
    return group.stripe, [*data, *group.parity]


def test_field_tables_match_shift_and_add() -> None:
    want = np.array([[ref.mul(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)
    assert np.array_equal(gf256.MUL, want)


@pytest.mark.parametrize("m", range(1, 5))
def test_parity_matrix_is_the_normalised_cauchy_with_xor_first(m: int) -> None:
    for k in (1, 2, 7, 32):
        matrix = gf256.cauchy_parity(k, m)
        assert matrix.tolist() == ref.parity_matrix(k, m)
        assert (matrix[0] == 1).all()


def _determinants(blocks: np.ndarray) -> np.ndarray:
    """Determinants of many s x s matrices over GF(2^8): in characteristic 2 the Leibniz sum has no signs."""
    count, s, _ = blocks.shape
    total = np.zeros(count, dtype=np.uint8)
    for perm in itertools.permutations(range(s)):
        term = np.ones(count, dtype=np.uint8)
        for row, col in enumerate(perm):
            term = gf256.MUL[term, blocks[:, row, col]]
        total ^= term
    return total


@pytest.mark.parametrize("m", range(1, 5))
def test_every_erasure_pattern_is_recoverable_for_every_k(m: int) -> None:
    """MDS: every k of the k+m rows of [I; P] are invertible iff every square submatrix of P is."""
    for k in range(1, 33):
        parity = gf256.cauchy_parity(k, m)
        for s in range(1, min(k, m) + 1):
            cols = np.array(list(itertools.combinations(range(k), s)))
            for rows in itertools.combinations(range(m), s):
                blocks = parity[np.array(rows)[None, :, None], cols[:, None, :]]
                assert _determinants(blocks).all(), f"singular {s}x{s} block for k={k}, m={m}"


@pytest.mark.parametrize(("k", "m"), [(4, 2), (5, 3), (6, 4), (10, 4)])
def test_every_set_of_k_survivors_inverts(k: int, m: int) -> None:
    g = gf256.generator(k, m).tolist()
    for have in itertools.combinations(range(k + m), k):
        assert ref.invert([g[i] for i in have]) is not None, have


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 6),
    m=st.integers(1, 4),
    size=st.integers(0, 200),
    ragged=st.booleans(),
    chunk=st.sampled_from([64, 128, 1 << 20]),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_loss_of_up_to_m_buffers_is_rebuilt_exactly(
    k: int, m: int, size: int, ragged: bool, chunk: int, backend: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, size + 1, k) if ragged else [size] * k
    data = [rng.integers(0, 256, int(n), dtype=np.uint8) for n in lengths]
    stripe, buffers = _all_buffers(data, m, chunk_bytes=chunk, backend=backend)
    assert [p.tobytes() for p in buffers[k:]] == ref.encode([d.tobytes() for d in data], m)
    for lost in range(1, m + 1):
        for pattern in itertools.combinations(range(k + m), lost):
            survivors = {i: b for i, b in enumerate(buffers) if i not in pattern}
            rebuilt = decode(survivors, stripe, chunk_bytes=chunk, backend=backend)
            assert sorted(rebuilt) == list(pattern)
            for i in pattern:
                assert np.array_equal(rebuilt[i], buffers[i]), (pattern, i)


def test_more_than_m_losses_name_what_is_missing() -> None:
    data = [np.arange(10, dtype=np.uint8)] * 4
    stripe, buffers = _all_buffers(data, 2)
    with pytest.raises(ValueError, match=r"buffers \[0, 1, 5\] are lost.*at most 2 losses"):
        decode({i: buffers[i] for i in (2, 3, 4)}, stripe)


@pytest.mark.parametrize("size", [0, 1, 7, 13, 4099])
def test_zero_and_odd_lengths(size: int) -> None:
    rng = np.random.default_rng(size)
    data = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(3)]
    stripe, buffers = _all_buffers(data, 2, chunk_bytes=1024)
    assert all(p.size == size for p in buffers[3:])
    rebuilt = decode({1: buffers[1], 4: buffers[4], 3: buffers[3]}, stripe)
    assert np.array_equal(rebuilt[0], data[0]) and np.array_equal(rebuilt[2], data[2])


def test_tensors_are_coded_as_their_bytes_without_copies() -> None:
    torch.manual_seed(0)
    base = torch.randn(16, 9, dtype=torch.bfloat16)
    contiguous = torch.randn(31)
    assert as_bytes(contiguous).data_ptr() == contiguous.data_ptr()
    tensors = [base.t(), contiguous, torch.arange(5, dtype=torch.int64)]
    group = encode(tensors, m=2, pad=True)
    assert all(isinstance(p, torch.Tensor) and p.dtype == torch.uint8 for p in group.parity)
    assert group.stripe.lengths == (16 * 9 * 2, 31 * 4, 5 * 8)
    survivors = {1: tensors[1], 3: group.parity[0], 4: group.parity[1]}
    rebuilt = decode(survivors, group.stripe)
    assert torch.equal(rebuilt[0].view(torch.bfloat16).reshape(9, 16), base.t())
    assert torch.equal(rebuilt[2].view(torch.int64), tensors[2])


def test_preallocated_parity_is_filled_in_place() -> None:
    data = [np.full(100, i, dtype=np.uint8) for i in range(1, 4)]
    out = [np.empty(100, dtype=np.uint8) for _ in range(2)]
    group = encode(data, m=2, out=out)
    assert group.parity[0] is not None and np.shares_memory(group.parity[0], out[0])
    assert (out[0] == 1 ^ 2 ^ 3).all()


@pytest.mark.skipif(isal.load() is None, reason="no libisal")
def test_isal_and_numpy_agree_over_many_chunks() -> None:
    rng = np.random.default_rng(7)
    data = [rng.integers(0, 256, 300_001, dtype=np.uint8) for _ in range(8)]
    fast = encode(data, m=3, chunk_bytes=65536, backend="isal").parity
    slow = encode(data, m=3, chunk_bytes=65536, backend="numpy").parity
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow))


def _stripe_and_buffers() -> tuple[Stripe, list[np.ndarray]]:
    return _all_buffers([np.arange(8, dtype=np.uint8)] * 3, 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: encode([np.zeros(4, np.uint8), np.zeros(5, np.uint8)], m=1), "different byte lengths"),
        (lambda: encode([], m=1), "k=0"),
        (lambda: encode([np.zeros(4, np.uint8)] * 33, m=1), "k=33"),
        (lambda: encode([np.zeros(4, np.uint8)], m=0), "m=0"),
        (lambda: encode([np.zeros(4, np.uint8)], m=5), "m=5"),
        (lambda: encode([np.zeros(4, np.uint8)], m=1, chunk_bytes=8), "chunk_bytes"),
        (lambda: encode([np.zeros(4, np.uint8)] * 2, m=2, backend="gpu"), "backend"),
        (lambda: encode([np.zeros(4, np.uint8)], m=1, out=[np.zeros(3, np.uint8)]), "out buffers"),
        (lambda: encode([np.zeros(4, np.uint8)], m=1, out=[np.zeros(8, np.uint8)[::2]]), "contiguous"),
        (lambda: encode([[1, 2]], m=1), "torch.Tensor or numpy"),
        (lambda: Stripe(k=2, m=1, lengths=(3,)), "data lengths"),
    ],
)
def test_bad_encode_input_is_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_survivors_are_refused() -> None:
    stripe, b = _stripe_and_buffers()
    with pytest.raises(ValueError, match="outside 0..4"):
        decode({0: b[0], 1: b[1], 5: b[2]}, stripe)
    with pytest.raises(ValueError, match="outside"):
        decode({-1: b[0], 1: b[1], 2: b[2]}, stripe)
    with pytest.raises(ValueError, match="given twice"):
        decode([(0, b[0]), (1, b[1]), (1, b[1])], stripe)
    with pytest.raises(ValueError, match="has 7 bytes"):
        decode({0: b[0][:7], 1: b[1], 2: b[2]}, stripe)
    with pytest.raises(ValueError, match="distinct indices"):
        decode({0: b[0], 1: b[1], 2: b[2]}, stripe, want=[3, 3])


def test_want_rebuilds_only_what_is_asked_and_more_survivors_are_fine() -> None:
    stripe, b = _stripe_and_buffers()
    rebuilt = decode(dict(enumerate(b[1:], start=1)), stripe, want=[0])
    assert list(rebuilt) == [0] and np.array_equal(rebuilt[0], b[0])
    assert decode(dict(enumerate(b)), stripe) == {}


def test_decode_matrix_for_one_loss_is_xor() -> None:
    """With m=1 every rebuild is an XOR, so it takes the XOR path."""
    matrix = erasure._decode_matrix(5, 1, (1, 2, 3, 4, 5), (0,))
    assert (matrix == 1).all()


def test_is_xor_holds_for_parity_zero_only() -> None:
    """A data buffer rebuilt from the XOR parity is the XOR of the survivors; from another parity it is not."""
    assert erasure.is_xor(3, 2, have=(1, 2, 3), want=0)
    assert not erasure.is_xor(3, 2, have=(1, 2, 4), want=0)
    assert erasure.is_xor(4, 1, have=(0, 1, 2, 3), want=4)  # parity 0 itself


def test_decode_into_preallocated_buffers() -> None:
    stripe, b = _stripe_and_buffers()
    out = {0: np.empty(8, np.uint8), 3: np.empty(8, np.uint8)}
    decode({1: b[1], 2: b[2], 4: b[4]}, stripe, out=out)
    assert np.array_equal(out[0], b[0]) and np.array_equal(out[3], b[3])
    with pytest.raises(ValueError, match="exactly the rebuilt indices"):
        decode({1: b[1], 2: b[2], 4: b[4]}, stripe, out={0: out[0]})


@pytest.mark.parametrize("size", [1, 63, 64, 100, 4099, 2**20 + 3])
def test_a_share_added_in_one_pass_equals_the_table_lookups(size: int) -> None:
    """accumulate multiplies and adds a share in place (ISA-L's gf_vect_mad where it is loaded)."""
    rng = np.random.default_rng(size)
    src = rng.integers(0, 256, size, dtype=np.uint8)
    start = rng.integers(0, 256, size + 5, dtype=np.uint8)
    for parity, index in [(0, 1), (1, 1), (2, 0)]:
        fast, slow = start.copy(), start.copy()
        erasure.accumulate(fast, src, k=3, m=3, parity=parity, index=index)
        erasure.accumulate(slow, src, k=3, m=3, parity=parity, index=index, backend="numpy")
        np.testing.assert_array_equal(fast, slow)
        assert np.array_equal(fast[size:], start[size:])


def test_scale_gives_every_coefficients_multiple() -> None:
    src = np.arange(300, dtype=np.uint8)
    shares = erasure.scale(src, [1, 2, 0])
    assert [s.tobytes() for s in shares] == [src.tobytes(), bytes(gf256.mul(2, int(b)) for b in src), bytes(300)]
