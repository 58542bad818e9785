"""Checkpointer round trip of an FSDP2 model and AdamW: save on dp=4, load on dp=2 x tp=2 (FSDP over
TP, strided shards), on one process, and into pipeline-stage parts with one optimizer each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_ckpt_workers import workers
from torch import nn

from resurgo.checkpoint.state.stateful import ModelState, OptimizerState
from resurgo.checkpoint.store.checkpointer import Checkpointer
from resurgo.trainer.config import CheckpointConfig


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self, layers: tuple[str, ...] = ("0", "1")) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({k: Block() for k in layers})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers.values():
            x = block(x)
        return x


def _checkpointer(root: str, model, optim, *, mesh: str, resume: str = "latest") -> Checkpointer:
    cfg = CheckpointConfig(every=1, keep=1, resume=resume)
    states = {"model": ModelState(model), "optim": OptimizerState(model, optim)}
    return Checkpointer(cfg, root=Path(root), states=states, topology={"mesh": mesh})


def _full(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a nested state, gathered whole (a collective for DTensors)."""
    from torch.distributed.tensor import DTensor

    from resurgo.checkpoint.state.flatten import flatten

    tensors, _ = flatten("s", state)
    return {
        n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone().contiguous() for n, t in tensors.items()
    }


def save_task(root: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    model = Tiny()
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    torch.manual_seed(1 + dist.get_rank())
    model(torch.randn(4, 8)).square().mean().backward()
    optim.step()
    ck = _checkpointer(root, model, optim, mesh="dp4")
    expected = {**_full(ck.states["model"].state_dict()), **_full(ck.states["optim"].state_dict())}
    ck.save(1)
    if dist.get_rank() == 0:
        save_file(expected, f"{root}/expected.safetensors")


def load_task(root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(5)
    model = Tiny()
    for block in model.layers.values():
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    optim = torch.optim.AdamW(model.parameters(), lr=0.5)  # no step yet: empty state
    ck = _checkpointer(root, model, optim, mesh="dp2xtp2")
    assert ck.resume() == 1
    _compare(ck, load_file(f"{root}/expected.safetensors"))
    assert optim.param_groups[0]["lr"] == 0.01


def _compare(ck: Checkpointer, expected: dict[str, torch.Tensor]) -> None:
    got = {**_full(ck.states["model"].state_dict()), **_full(ck.states["optim"].state_dict())}
    assert got.keys() <= expected.keys() and got
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    workers().run(save_task, str(root))
    return root


def test_fsdp_adamw_resumes_on_fsdp_over_tp(saved):
    workers().run(load_task, str(saved))


def test_single_process_resumes_into_pipeline_stage_parts(saved):
    torch.manual_seed(9)
    parts = [Tiny(("0",)), Tiny(("1",))]  # two stages on one rank; FQNs keep their layer index
    optims = [torch.optim.AdamW(p.parameters(), lr=0.3) for p in parts]
    cfg = CheckpointConfig(resume="latest")
    ck = Checkpointer(cfg, root=saved, states={"model": ModelState(parts), "optim": OptimizerState(parts, optims)})
    assert ck.resume() == 1
    expected = load_file(f"{saved}/expected.safetensors")
    _compare(ck, expected)
    assert {n for n in _full(ck.states["model"].state_dict())} == {n for n in expected if n.startswith("s/layers")}
    assert all(o.param_groups[0]["lr"] == 0.01 for o in optims)


def test_weights_only_leaves_the_optimizer_alone(saved):
    model = Tiny()
    optim = torch.optim.AdamW(model.parameters(), lr=0.3)
    cfg = CheckpointConfig(resume="latest", load_optimizer=False)
    ck = Checkpointer(cfg, root=saved, states={"model": ModelState(model), "optim": OptimizerState(model, optim)})
    assert ck.resume() == 1
    assert optim.param_groups[0]["lr"] == 0.3
    expected = load_file(f"{saved}/expected.safetensors")
    assert torch.equal(model.layers["1"].down.weight.detach(), expected["s/layers.1.down.weight"])


def safetensors_task(folder: str, expected_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from resurgo.checkpoint.store.safetensors_io import load_safetensors

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = Tiny()
    for block in model.layers.values():
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    state = ModelState(model).state_dict()
    load_safetensors(Path(folder), state)
    expected = load_file(expected_file)
    for name, tensor in state.items():
        assert torch.equal(tensor.full_tensor(), expected[f"s/{name}"].to(torch.bfloat16).float()), name


def test_safetensors_export_initializes_a_sharded_model(saved, tmp_path):
    from resurgo.checkpoint.store.commit import latest
    from resurgo.checkpoint.store.reader import Checkpoint
    from resurgo.checkpoint.store.safetensors_io import export_safetensors

    export_safetensors(Checkpoint.open(latest(saved)), tmp_path, dtype="bf16", max_shard_bytes=256)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    workers().run(safetensors_task, str(tmp_path), f"{saved}/expected.safetensors")
