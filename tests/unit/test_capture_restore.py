"""A restore through the capture: parameters and optimizer state are overwritten in place and only
their JSON is applied after; other states load through load_state_dict, as from disk."""

from __future__ import annotations

import torch
from test_snapshot import Ema, Net, Progress

from resurgo.checkpoint.capture import StateCapture
from resurgo.checkpoint.flatten import flatten
from resurgo.checkpoint.states import ModelState, OptimizerState


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


def test_a_model_with_extra_state_loads_through_load_state_dict() -> None:
    class WithExtra(Net):
        def get_extra_state(self):
            return {"version": 2}

        def set_extra_state(self, state) -> None:
            self.loaded_extra = state

    model = WithExtra()
    capture = StateCapture({"model": ModelState(model)}, rank=0)
    targets = capture.restore_targets()
    assert "model" in targets.templates
