"""Save from one topology, load on another: every rank's data equals its slice of the saved tensor."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_ckpt_workers import TensorState, workers

from resurgo.checkpoint.store.checkpointer import Checkpointer
from resurgo.checkpoint.store.commit import latest
from resurgo.trainer.config import CheckpointConfig

SHAPES = {
    "w_dp": ((10, 6), torch.float32),
    "w_col": ((8, 12), torch.float32),
    "w_2d": ((8, 8), torch.float32),
    "w_st": ((12, 6), torch.float32),
    "w_rep": ((5, 3), torch.float32),
    "plain": ((7,), torch.float32),
    "bf": ((6, 4), torch.bfloat16),
    "stage0.w": ((6, 4), torch.float32),
    "stage1.w": ((6, 4), torch.float32),
    "scalar": ((), torch.float32),
    "sparse": ((3, 5), torch.int64),
}


SAVED_MESH = "dp4+dp2xtp2"


def global_tensor(name: str) -> torch.Tensor:
    shape, dtype = SHAPES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if dtype == torch.int64:
        return torch.randint(-100, 100, shape, generator=g)
    return torch.randn(shape, generator=g).to(dtype)


def _meshes():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (4,), mesh_dim_names=("dp",)), init_device_mesh(
        "cpu", (2, 2), mesh_dim_names=("dp", "tp")
    )


def _place(name: str, mesh, placements) -> torch.Tensor:
    from torch.distributed.tensor import distribute_tensor

    if mesh is None:
        return global_tensor(name).clone()
    return distribute_tensor(global_tensor(name), mesh, placements, src_data_rank=None)


def save_layouts(rank: int):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    dp, mesh2 = _meshes()
    stage = rank // 2
    return {
        "w_dp": (dp, [Shard(0)]),  # 10 rows over 4: 3, 3, 3, 1
        "w_col": (dp, [Shard(1)]),
        "w_2d": (mesh2, [_StridedShard(0, split_factor=2), Shard(0)]),  # FSDP over TP
        "w_st": (mesh2, [Shard(0), Shard(1)]),
        "w_rep": (mesh2, [Shard(0), Replicate()]),
        "plain": (None, None),
        "bf": (dp, [Shard(0)]),
        f"stage{stage}.w": (mesh2["tp"], [Shard(0)]),  # a pipeline stage: only its two ranks hold it
        "scalar": (None, None),
        "sparse": (dp, [Shard(0)]),  # 3 rows over 4: the last rank holds nothing
    }


def load_layouts(rank: int):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    dp, mesh2 = _meshes()
    return {
        "w_dp": (mesh2, [Shard(1), Shard(0)]),
        "w_col": (dp, [Shard(0)]),
        "w_2d": (dp, [Shard(1)]),
        "w_st": (mesh2, [_StridedShard(0, split_factor=2), Shard(0)]),
        "w_rep": (None, None),
        "plain": (dp, [Shard(0)]),
        "bf": (mesh2, [Replicate(), Shard(1)]),
        f"stage{rank % 2}.w": (None, None),  # stages regrouped: now plain tensors on ranks {0,2} and {1,3}
        "scalar": (None, None),
        "sparse": (dp, [Shard(1)]),
    }


def _checkpointer(root: str, states, *, mesh: str) -> Checkpointer:
    cfg = CheckpointConfig(every=1, keep=2, resume="latest")
    return Checkpointer(cfg, root=Path(root), states=states, topology={"mesh": mesh}, max_chunk_bytes=64)


def save_task(root: str) -> str:
    import torch.distributed as dist

    rank = dist.get_rank()
    tensors = {n: _place(n, *p) for n, p in save_layouts(rank).items()}
    info = TensorState({"rank": rank, "note": "saved"})
    return str(_checkpointer(root, {"t": TensorState(tensors), "info": info}, mesh=SAVED_MESH).save(3))


def load_task(root: str, mesh: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank()
    layouts = save_layouts(rank) if mesh == SAVED_MESH else load_layouts(rank)
    templates = {n: torch.zeros_like(_place(n, *p)) for n, p in layouts.items()}
    state, info = TensorState(templates), TensorState({"rank": -1, "note": ""})
    step = _checkpointer(root, {"t": state, "info": info}, mesh=mesh).resume()
    assert step == 3
    for name, (m, placements) in layouts.items():
        got = state.state[name]
        want = _place(name, m, placements)
        got_local = got.to_local() if isinstance(got, DTensor) else got
        want_local = want.to_local() if isinstance(want, DTensor) else want
        assert got_local.dtype == want_local.dtype, name
        assert torch.equal(got_local, want_local), f"{name} on rank {rank}"
    return info.state


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reshard")
    paths = workers().run(save_task, str(root))
    assert len(set(paths)) == 1
    return root


def test_load_on_another_mesh_gives_every_rank_its_slice(saved):
    infos = workers().run(load_task, str(saved), "other")
    # A different topology: every rank gets saved rank 0's JSON state.
    assert [i["rank"] for i in infos] == [0, 0, 0, 0]


def test_same_topology_restores_each_ranks_own_json_state(saved):
    infos = workers().run(load_task, str(saved), SAVED_MESH)
    assert [i["rank"] for i in infos] == [0, 1, 2, 3]


def test_single_process_loads_full_tensors(saved):
    templates = {n: torch.zeros(s, dtype=d) for n, (s, d) in SHAPES.items()}
    state = TensorState(templates)
    assert _checkpointer(str(saved), {"t": state, "info": TensorState({})}, mesh="none").resume() == 3
    for name in SHAPES:
        assert torch.equal(state.state[name], global_tensor(name)), name


def test_plain_zarr_reads_the_full_tensor(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open(str(latest(saved)), mode="r")
        for name in ("w_dp", "w_2d", "w_st", "stage1.w", "sparse"):
            np.testing.assert_array_equal(group[f"t/{name}"][...], global_tensor(name).numpy())
        bf = group["t/bf"]
        assert bf.attrs["torch_dtype"] == "bfloat16"
        assert torch.equal(torch.from_numpy(bf[...]).view(torch.bfloat16), global_tensor("bf"))


def test_every_chunk_file_exists_and_replicas_are_written_once(saved):
    from resurgo.checkpoint.store.reader import Checkpoint, verify

    ckpt = Checkpoint.open(latest(saved))
    assert verify(ckpt) == []
    plain = ckpt.meta.arrays["t/plain"]
    assert len(plain.pieces) == 1 and plain.pieces[0].holders == (0, 1, 2, 3)
    w_rep = ckpt.meta.arrays["t/w_rep"]
    assert sorted(len(p.holders) for p in w_rep.pieces) == [2, 2]
    writers = {p.writer for a in ckpt.meta.arrays.values() for p in a.pieces}
    assert writers == {0, 1, 2, 3}


def partial_task(root: str) -> str:
    from torch.distributed.tensor import DTensor, Partial

    from resurgo.checkpoint.errors import CheckpointError

    dp, _ = _meshes()
    grads = {"g": DTensor.from_local(torch.ones(2), dp, [Partial()])}
    try:
        _checkpointer(root, {"t": TensorState(grads)}, mesh="dp4").save(1)
    except CheckpointError as e:
        return str(e)
    raise AssertionError("a Partial tensor was saved")


def test_partial_placement_is_refused_on_every_rank(tmp_path):
    messages = workers().run(partial_task, str(tmp_path))
    assert all("tensor 't/g' has placement" in m and "Partial" in m for m in messages)


def disk_full_on_one_rank_task(root: str) -> str:
    import errno

    import torch.distributed as dist

    from resurgo.checkpoint.errors import CheckpointError
    from resurgo.checkpoint.store import writer as store

    rank = dist.get_rank()
    tensors = {n: _place(n, *p) for n, p in save_layouts(rank).items()}
    ck = _checkpointer(root, {"t": TensorState(tensors)}, mesh=SAVED_MESH)
    ck.save(1)
    write = store.write_buffers
    if rank == 2:
        store.write_buffers = lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
    try:
        ck.save(2)
    except CheckpointError as e:
        return str(e)
    finally:
        store.write_buffers = write
    raise AssertionError("the save succeeded")


def test_disk_full_on_one_rank_fails_the_save_everywhere(tmp_path):
    messages = workers().run(disk_full_on_one_rank_task, str(tmp_path))
    assert all("[rank 2]" in m and "disk is full" in m and "step-00000001" in m for m in messages)
    assert latest(tmp_path) == tmp_path / "step-00000001"
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
