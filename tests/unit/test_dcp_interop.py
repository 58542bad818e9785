"""torch.distributed.checkpoint in and out, against a real `dcp.save` of resurgo's model under FSDP2 x TP
(dp_shard=2 x tp=2 on 4 gloo ranks) saved the way torchtitan saves it: the conversion is exact, a run
resumed from it (on dp_shard=4) continues with the plain loop's losses, an export loads with `dcp.load`
on another topology, and crafted or incomplete folders are refused with the file named."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from test_ckpt_workers import WORLD, workers

from resurgo.checkpoint.errors import CheckpointError
from resurgo.checkpoint.store.dcp_io import convert_dcp, export_dcp
from resurgo.checkpoint.store.reader import Checkpoint
from resurgo.checkpoint.store.safe_unpickle import UnsafePickle

SAVED_AT = 3  # optimizer steps before the DCP save
MORE = 2  # steps after it, compared with the resumed run's


def make_trainer(run_dir: str, parallel: dict[str, int], *, resume: str = "none"):
    from resurgo.trainer.config import load_config
    from resurgo.trainer.distributed import init_distributed
    from resurgo.trainer.trainer import Trainer

    rank = torch.distributed.get_rank()
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), TORCHELASTIC_RESTART_COUNT="0")
    cfg = load_config(
        OmegaConf.create(
            {
                "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
                "train": {"device": "cpu", "steps": 8, "seq_len": 16, "batch_size": 4, "log_every": 0},
                "optim": {"schedule": {"warmup_steps": 2}},
                "parallel": parallel,
                "checkpoint": {"every": 0, "resume": resume},
                "fault": {"keeper": "off"},
            }
        )
    )
    return Trainer(cfg, env=init_distributed("cpu"), run_dir=Path(run_dir))


def _full(state: dict) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def titan_task(root: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The plain loop on resurgo's model, sampler and schedule; `dcp.save` after SAVED_AT steps as
    torchtitan saves (model FQNs at the top, the flattened optimizer under 'optimizer'); the next
    MORE losses and the parameters they end with."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.nn.functional as F
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from resurgo.trainer.optim import lr_at, set_lr

    trainer = make_trainer(f"{root}/titan", {"tp": 2, "dp_shard": 2})
    model, optim, cfg = trainer.parts.modules[0], trainer.optimizers[0], trainer.cfg
    losses = []
    for step in range(SAVED_AT + MORE):
        if step == SAVED_AT:
            flat = StateDictOptions(flatten_optimizer_state_dict=True)
            state = {
                **get_model_state_dict(model),
                "optimizer": get_optimizer_state_dict(model, optim, options=flat),
                "train_state": {"step": torch.tensor(step)},
            }
            dcp.save(state, checkpoint_id=f"{root}/dcp")
            expected = _full(state["optimizer"]) | {
                f"model.{k}": v for k, v in _full(get_model_state_dict(model)).items()
            }
            if dist.get_rank() == 0:
                save_file(expected, f"{root}/expected.safetensors")
        inputs, targets = trainer.sampler.next_batch(global_batch=cfg.train.batch_size, dp_rank=trainer.dp_rank, dp=2)
        set_lr(optim, lr_at(step, cfg=cfg.optim, total_steps=cfg.train.steps))
        loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
        loss.backward()
        trainer.clip_gradients()  # to the global norm over both meshes (torch's own needs one mesh)
        optim.step()
        optim.zero_grad(set_to_none=True)
        total = loss.detach().double()
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
    trainer.close()
    return losses[SAVED_AT:], _full(get_model_state_dict(model))


def resume_task(run_dir: str, converted: str) -> tuple[list[float], int, int, dict[str, torch.Tensor]]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainer = make_trainer(run_dir, {"dp_shard": 4}, resume=converted)
    protection = trainer.build_protection()
    protection.resume()
    step, consumed = trainer.progress.step, trainer.sampler.consumed
    losses = [trainer.train_step().loss for _ in range(MORE)]
    protection.close(step=trainer.progress.step)
    trainer.close()
    return losses, step, consumed, _full(get_model_state_dict(trainer.parts.modules[0]))


def load_export_task(run_dir: str, exported: str) -> dict[str, torch.Tensor]:
    """A fresh model and optimizer on dp_shard=4 (no TP), loaded with plain `dcp.load`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    trainer = make_trainer(run_dir, {"dp_shard": 4})
    model, optim = trainer.parts.modules[0], trainer.optimizers[0]
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    state = {**get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optim, options=flat)}
    dcp.load(state, checkpoint_id=exported)
    set_optimizer_state_dict(model, optim, state.pop("optimizer"), options=flat)
    set_model_state_dict(model, state)
    got = _full(get_optimizer_state_dict(model, optim, options=flat)) | {
        f"model.{k}": v for k, v in _full(get_model_state_dict(model)).items()
    }
    trainer.close()
    return got


@pytest.fixture(scope="module")
def titan(tmp_path_factory) -> tuple[Path, list[float], dict[str, torch.Tensor]]:
    """The DCP folder, and the plain loop's next losses and final parameters."""
    root = tmp_path_factory.mktemp("dcp")
    results = workers().run(titan_task, str(root), timeout=120)
    assert results[0][0] == results[-1][0]  # every rank saw the same global losses
    return root, *results[0]


@pytest.fixture(scope="module")
def converted(titan, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("converted")
    return convert_dcp(titan[0] / "dcp", root, name_map=None, progress=False, overwrite=False)


def _resurgo_name(dcp_name: str) -> str:
    if dcp_name.startswith("model."):
        return "model/" + dcp_name.removeprefix("model.")
    fqn, field = dcp_name.removeprefix("state.").rsplit(".", 1)
    return f"optim/state/{fqn}/{field}"


def test_convert_gives_the_exact_tensors_at_the_optimizer_step(titan, converted):
    from resurgo.checkpoint.store.safetensors_io import _read_whole

    expected = load_file(titan[0] / "expected.safetensors")
    ckpt = Checkpoint.open(converted)
    assert converted.name == f"step-{SAVED_AT:08d}" and ckpt.meta.step == SAVED_AT
    assert set(ckpt.meta.arrays) == {_resurgo_name(n) for n in expected}
    assert any(n.endswith("/exp_avg_sq") for n in ckpt.meta.arrays) and any(
        n.endswith("/step") for n in ckpt.meta.arrays
    )
    for name, tensor in expected.items():
        got = _read_whole(ckpt, _resurgo_name(name))
        assert got.dtype == tensor.dtype == torch.float32 and torch.equal(got, tensor), name
    groups = ckpt.meta.states.of_rank(0)["optim"]["param_groups"]
    assert groups["norm.weight"]["betas"] == [0.9, 0.95] and "fused" not in groups["norm.weight"]


def test_training_resumed_from_the_conversion_continues_with_the_plain_loops_losses(titan, converted, tmp_path):
    results = workers().run(resume_task, str(tmp_path / "run"), str(converted), timeout=120)
    for losses, step, consumed, params in results:
        assert (step, consumed) == (SAVED_AT, SAVED_AT * 4)  # data position derived from the step
        assert losses == pytest.approx(titan[1], rel=1e-5, abs=1e-6)
        # The updates depend on the converted moments and step (bias correction), not only the weights.
        for name, param in titan[2].items():
            assert torch.allclose(params[name], param, rtol=1e-5, atol=1e-6), name


def test_export_loads_with_plain_dcp_on_another_topology(titan, converted, tmp_path):
    out = tmp_path / "export"
    assert export_dcp(Checkpoint.open(converted), out, dtype=None, progress=False, overwrite=False) == out
    expected = load_file(titan[0] / "expected.safetensors")
    got = workers().run(load_export_task, str(tmp_path / "run"), str(out), timeout=120)[0]
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    with pytest.raises(CheckpointError, match="is not empty.*--overwrite"):
        export_dcp(Checkpoint.open(converted), out, dtype=None, progress=False, overwrite=False)
    export_dcp(Checkpoint.open(converted), out, dtype="bf16", progress=False, overwrite=True)
    assert not list(tmp_path.glob(".export.*"))  # no temporary folder left behind


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_metadata_pickle_is_refused_before_anything_runs(titan, tmp_path):
    folder = tmp_path / "crafted"
    shutil.copytree(titan[0] / "dcp", folder)
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UnsafePickle, match=r"crafted/\.metadata.*asks for posix\.system"):
        convert_dcp(folder, tmp_path / "out", name_map=None, progress=False, overwrite=False)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_missing_data_file_is_a_clear_error(titan, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(titan[0] / "dcp", folder)
    gone = sorted(folder.glob("*.distcp"))[-1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=rf"{gone.name} is missing: the DCP checkpoint is incomplete"):
        convert_dcp(folder, tmp_path / "out", name_map=None, progress=False, overwrite=False)


def test_converting_onto_an_existing_step_needs_overwrite(titan, converted):
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        convert_dcp(titan[0] / "dcp", converted.parent, name_map=None, progress=False, overwrite=False)
    assert convert_dcp(titan[0] / "dcp", converted.parent, name_map=None, progress=False, overwrite=True) == converted


class _Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(3, 3, bias=False) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_get_state_dicts_nesting_and_a_name_map_through_the_cli(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from resurgo.checkpoint.store.safetensors_io import _read_whole
    from resurgo.launch.ckpt import main

    torch.manual_seed(0)
    model = _Blocks()
    optim = torch.optim.AdamW(model.parameters(), lr=0.5)
    model(torch.randn(2, 3)).sum().backward()
    optim.step()
    model_state, optim_state = get_state_dict(model, optim)  # param groups by index, with their "params"
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp_path / "src", no_dist=True)
    names = tmp_path / "names.json"
    names.write_text(r'{"names": {"blocks\\.(\\d+)\\.weight": "layers.\\1.feed_forward.w1.weight"}}')
    assert (
        main(["convert", "--from", "dcp", str(tmp_path / "src"), str(tmp_path / "out"), "--name-map", str(names)]) == 0
    )
    ckpt = Checkpoint.open(tmp_path / "out" / "step-00000001")
    ours = "layers.1.feed_forward.w1.weight"
    assert torch.equal(_read_whole(ckpt, f"model/{ours}"), model.blocks[1].weight.detach())
    assert torch.equal(_read_whole(ckpt, f"optim/state/{ours}/exp_avg"), optim.state[model.blocks[1].weight]["exp_avg"])
    assert ckpt.meta.states.of_rank(0)["optim"]["param_groups"][ours]["lr"] == 0.5
    names.write_text(r'{"names": {"blocks\\.0\\.weight": "layers.0.feed_forward.w1.weight"}}')
    assert main(["convert", "--from", "dcp", str(tmp_path / "src"), str(tmp_path / "x"), "--name-map", str(names)]) == 2
    assert "1 tensor name(s) no rule translates" in capsys.readouterr().err
