"""Layouts and save plans as pure data: fragments tile the tensor, chunks align, replicas dedupe."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from resurgo.checkpoint.errors import CheckpointError
from resurgo.checkpoint.state.layout import Box, MeshSpec, Placement, TensorLayout
from resurgo.checkpoint.store.grid import choose_grid, tile
from resurgo.checkpoint.store.save_plan import array_path, chunk_reads, plan_reads, plan_save


def _layout(shape, sizes, placements, name="w") -> TensorLayout:
    mesh = MeshSpec(tuple(f"a{i}" for i in range(len(sizes))), tuple(sizes), tuple(range(math.prod(sizes))))
    return TensorLayout(name, tuple(shape), "float32", mesh, tuple(placements))


def _torch_placement(p: Placement):
    return {"replicate": lambda: Replicate(), "shard": lambda: Shard(p.dim)}.get(
        p.kind, lambda: _StridedShard(p.dim, split_factor=p.split_factor)
    )()


def test_uneven_shard_follows_torch_chunk():
    layout = _layout((10, 3), (4,), [Placement("shard", 0)])
    assert [layout.fragment(r).segments[0] for r in range(4)] == [((0, 3),), ((3, 6),), ((6, 9),), ((9, 10),)]


def test_strided_shard_matches_torch_docstring_example():
    # torch's _StridedShard docstring: 9 elements, split_factor 2 over 4 ranks -> [0,1,5] [2,3,6] [4,7] [8]
    layout = _layout((9,), (4,), [Placement("strided_shard", 0, 2)])
    got = [[i for a, b in layout.fragment(r).segments[0] for i in range(a, b)] for r in range(4)]
    assert got == [[0, 1, 5], [2, 3, 6], [4, 7], [8]]


placements = st.one_of(
    st.just(Placement("replicate")),
    st.builds(Placement, st.just("shard"), st.integers(0, 1)),
    st.builds(Placement, st.just("strided_shard"), st.integers(0, 1), st.integers(1, 3)),
)


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 13), st.integers(1, 9)),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    data=st.data(),
)
def test_fragments_tile_the_tensor_like_dtensor(shape, sizes, data):
    layout = _layout(shape, sizes, [data.draw(placements) for _ in sizes])
    full = np.arange(math.prod(shape)).reshape(shape)
    covered = np.zeros(shape, dtype=int)
    for rank in range(math.prod(sizes)):
        fragment = layout.fragment(rank)
        torch_shape, _ = _compute_local_shape_and_global_offset(
            shape, tuple(sizes), list(layout.mesh.coordinate(rank)), [_torch_placement(p) for p in layout.placements]
        )
        assert fragment.local_shape == tuple(torch_shape)
        local = np.empty(fragment.local_shape, dtype=int)
        for box, where in fragment.pieces():
            local[where] = full[box.slices()]
            covered[box.slices()] += 1
        if all(p.kind == "shard" for p in layout.placements):  # regular case: one box at torch's offset
            assert len(fragment.boxes()) <= 1
    replicas = math.prod(s for s, p in zip(sizes, layout.placements) if p.kind == "replicate")
    assert (covered == replicas).all()


def test_plan_writes_each_replica_once_and_spreads_writers():
    plain = TensorLayout("p", (4, 4), "float32")
    frags = {
        r: [TensorLayout(f"x{i}", (8,), "float32").fragment(r) for i in range(8)] + [plain.fragment(r)]
        for r in range(4)
    }
    plan = plan_save(frags, world_size=4)
    for array in plan.arrays.values():
        assert len(array.pieces) == 1 and array.pieces[0].holders == (0, 1, 2, 3)
    counts = [len(plan.writes_for(r)) for r in range(4)]
    assert sum(counts) == 9 and max(counts) - min(counts) <= 1


def test_shards_align_with_uneven_boxes_and_chunks_tile_them():
    layout = _layout((10, 6), (4,), [Placement("shard", 0)])
    plan = plan_save({r: [layout.fragment(r)] for r in range(4)}, world_size=4, max_chunk_bytes=24)
    assert (plan.arrays["w"].shards, plan.arrays["w"].chunks) == ((3, 6), (1, 3))
    halves = [Box((0, 0), (2048, 1024)), Box((2048, 0), (2048, 1024))]
    assert choose_grid((4096, 1024), halves, itemsize=4, max_chunk_bytes=1 << 20, max_shard_bytes=4 << 20) == (
        (1024, 1024),
        (512, 512),
    )
    assert tile((3, 1 << 20), itemsize=4, max_bytes=1 << 20) == (3, 1 << 16)
    # A large prime side is left alone rather than cut into one-row slivers.
    assert tile((50257, 64), itemsize=4, max_bytes=1 << 20) == (50257, 4)


def test_gaps_overlaps_and_disagreeing_shapes_are_refused_by_name():
    layout = _layout((8,), (2,), [Placement("shard", 0)])
    with pytest.raises(CheckpointError, match=r"tensor 'w': no rank holds"):
        plan_save({0: [layout.fragment(0)]}, world_size=2)
    with pytest.raises(CheckpointError, match=r"'w': rank 0 has shape \(8,\) float32 but rank 1 has \(9,\)"):
        plan_save({0: [layout.fragment(0)], 1: [TensorLayout("w", (9,), "float32").fragment(1)]}, world_size=2)
    other = _layout((8,), (4,), [Placement("shard", 0)])
    with pytest.raises(CheckpointError, match=r"tensor 'w': box .* overlaps"):
        plan_save({0: [layout.fragment(0)], 1: [other.fragment(1)]}, world_size=2)
    with pytest.raises(CheckpointError, match="clash"):
        plan_save(
            {0: [TensorLayout("a", (1,), "float32").fragment(0), TensorLayout("a/b", (1,), "float32").fragment(0)]},
            world_size=1,
        )


def test_array_paths_cannot_escape_or_clash_with_zarr_files():
    assert array_path("model/layers.0.w") == "model/layers.0.w"
    assert ".." not in array_path("a/../b").split("/")
    assert array_path("x/zarr.json") != "x/zarr.json" and array_path("__x") != "__x"
    with pytest.raises(CheckpointError, match="empty path component"):
        array_path("a//b")


def test_read_plan_reads_only_overlapping_chunks_once():
    saved = _layout((8, 8), (4,), [Placement("shard", 0)])
    plan = plan_save({r: [saved.fragment(r)] for r in range(4)}, world_size=4)
    target = _layout((8, 8), (2, 2), [Placement("strided_shard", 0, 2), Placement("shard", 0)])
    reads = plan_reads(plan.arrays, [target.fragment(r) for r in range(4)])
    for rank in range(4):
        assert [len(r.chunks) for r in reads.reads[rank]["w"]] == [1]  # two rows, one saved chunk
        assert reads.bytes_read(rank) == 2 * 8 * 4 + 4
    column = _layout((8, 8), (2,), [Placement("shard", 1)])
    assert sum(len(r.chunks) for r in chunk_reads(plan.arrays["w"], column.fragment(0))) == 4
