"""A restore through the capture: parameters and optimizer state are overwritten in place and only
their JSON is applied after; other states load through load_state_dict, as from disk."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from test_snapshot import Ema, Net, Progress

from resurgo.checkpoint.snapshot.capture import StateCapture
from resurgo.checkpoint.snapshot.engine import HostCopier, slot_views
from resurgo.checkpoint.state.flatten import flatten
from resurgo.checkpoint.state.stateful import ModelState, OptimizerState


def trained(seed: int, *, lr: float, steps: int) -> tuple[dict, torch.optim.Optimizer, Progress, Ema]:
    torch.manual_seed(seed)
    model = Net()
    optim = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    progress, ema = Progress(), Ema(model)
    for _ in range(steps):
        model(torch.randn(6, 8)).square().mean().backward()
        optim.step()
        optim.zero_grad()
        progress.step += 1
        ema.avg += 1.0
    for group in optim.param_groups:
        group["lr"] = lr
    states = {"model": ModelState(model), "optim": OptimizerState(model, optim), "progress": progress, "ema": ema}
    return states, optim, progress, ema


def test_a_restore_fills_the_live_tensors_and_applies_the_json() -> None:
    saved, _, _, _ = trained(0, lr=0.123, steps=3)
    tensors, trees = {}, {}
    for key, state in saved.items():
        found, trees[key] = flatten(key, state.state_dict())
        tensors.update({name: t.detach().clone() for name, t in found.items()})

    states, optim, progress, ema = trained(1, lr=0.5, steps=1)  # other values, same structure
    capture = StateCapture(states, rank=0)
    live = capture.restore_targets().tensors
    targets = capture.restore_targets()
    assert set(targets.tensors) == set(tensors)
    assert set(targets.templates) == {"progress", "ema"}  # only these go through load_state_dict
    for name, tensor in targets.tensors.items():
        tensor.copy_(tensors[name])
    capture.load(targets, trees)

    for key in ("model", "optim"):
        found, tree = flatten(key, states[key].state_dict())
        assert tree == trees[key]
        for name, tensor in found.items():
            assert torch.equal(tensor, tensors[name]), name
            if name in live:
                assert tensor.data_ptr() == live[name].data_ptr(), f"{name} was replaced, not filled in place"
    assert [g["lr"] for g in optim.param_groups] == [0.123]
    assert optim.param_groups[0]["betas"] == (0.8, 0.9) and isinstance(optim.param_groups[0]["betas"], tuple)
    assert progress.step == 3 and torch.equal(ema.avg, tensors["ema/avg"])
    assert capture.current_layout() is capture.layout  # the captured references stay valid


def round_trip(source: dict, target: dict, *, step: int) -> StateCapture:
    """Snapshot `source` into slot memory as the engine does (take, then copy into the slot's views),
    then restore `target` from it as a resume from keeper memory does; returns target's capture."""
    capture = StateCapture(source, rank=0)
    captured = capture.take(step)
    layout = capture.layout
    slot = SimpleNamespace(array=lambda memory=np.zeros(layout.nbytes, np.uint8): memory)  # a segment's bytes
    views = slot_views(slot, layout)
    HostCopier().copy(views, captured.tensors, None)
    restored = StateCapture(target, rank=0)
    assert restored.current_layout().digest == layout.digest  # the check a resume from memory makes first
    targets = restored.restore_targets()
    for entry, view in zip(layout.entries, views):
        targets.tensors[entry.name].copy_(view)
    restored.load(targets, captured.tree)
    return restored


def assert_same_state(a: dict, b: dict) -> None:
    """Every tensor bit-equal and every JSON value equal, state by state."""
    assert a.keys() == b.keys()
    for key in a:
        tensors_a, tree_a = flatten(key, a[key].state_dict())
        tensors_b, tree_b = flatten(key, b[key].state_dict())
        assert tree_a == tree_b, key
        assert tensors_a.keys() == tensors_b.keys(), key
        for name in tensors_a:
            assert torch.equal(tensors_a[name], tensors_b[name]), name


def train_step(states: dict, optim: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model = states["model"].parts[0]
    model(x).square().mean().backward()
    optim.step()
    optim.zero_grad()
    states["progress"].step += 1


def test_a_snapshot_of_one_model_restores_a_differently_initialised_one_exactly() -> None:
    source, source_optim, _, _ = trained(0, lr=0.123, steps=3)
    target, target_optim, progress, ema = trained(1, lr=0.5, steps=1)  # other weights, moments, BatchNorm stats
    target_optim.param_groups[0]["weight_decay"] = 0.3  # and other hyperparameters
    theirs = source["model"].state_dict()
    assert all(not torch.equal(t, theirs[n]) for n, t in target["model"].state_dict().items() if t.is_floating_point())

    round_trip(source, target, step=3)
    assert_same_state(target, source)
    assert progress.step == 3 and target_optim.param_groups[0]["weight_decay"] == 0.01
    assert target_optim.param_groups[0]["lr"] == 0.123

    # Nothing the restore missed shows up later either: one more step on the same batch stays identical.
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(7))
    train_step(source, source_optim, x)
    train_step(target, target_optim, x)
    assert_same_state(target, source)


def test_a_model_with_extra_state_loads_through_load_state_dict() -> None:
    class WithExtra(Net):
        def __init__(self, version: int) -> None:
            super().__init__()
            self.version = version

        def get_extra_state(self):
            return {"version": self.version}

        def set_extra_state(self, state) -> None:
            self.version = state["version"]

    torch.manual_seed(0)
    source = WithExtra(2)
    torch.manual_seed(1)
    target = WithExtra(1)
    capture = StateCapture({"model": ModelState(target)}, rank=0)
    assert "model" in capture.restore_targets().templates  # its extra state is not a tensor: load_state_dict applies it
    round_trip({"model": ModelState(source)}, {"model": ModelState(target)}, step=1)
    assert target.version == 2
    for name, tensor in source.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        assert torch.equal(target.state_dict()[name], tensor), name
