"""checkpoint.exclude under a strict load: the excluded tensors keep their current values, everything
else loads, and what exclude covers (a changed shape, a tensor new to the state or gone from it)
raises no mismatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_ckpt_workers import TensorState

from resurgo.checkpoint.errors import CheckpointError
from resurgo.checkpoint.store.checkpointer import Checkpointer
from resurgo.trainer.config import CheckpointConfig


def saved() -> dict:
    return {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "head": torch.full((3, 4), 5.0),
        "norm": torch.full((4,), 2.0),
        "old": torch.ones(2),  # gone from the state loading it
        "lr": 0.5,
    }


def loading() -> dict:
    """A fine-tuning state: a wider head, a new tensor, no `old`, every tensor -7 until loaded."""
    return {
        "a": torch.full((3, 4), -7.0),
        "head": torch.full((5, 4), -7.0),
        "norm": torch.full((4,), -7.0),
        "new_bias": torch.full((5,), -7.0),
        "lr": 0.1,
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    Checkpointer(CheckpointConfig(keep=2), root=tmp_path, states={"t": TensorState(saved())}).save(4)
    return tmp_path


def load(root: Path, state: TensorState, exclude: list[str]) -> int:
    cfg = CheckpointConfig(resume="latest", exclude=exclude)
    return Checkpointer(cfg, root=root, states={"t": state}, strict=True).resume()


def test_strict_load_without_exclude_names_every_mismatch(root):
    """The control: without exclude the same load is refused, and nothing is loaded. The error of
    resume=latest says why the checkpoint was skipped, and what to change."""
    state = TensorState(loading())
    with pytest.raises(CheckpointError) as info:
        load(root, state, exclude=[])
    message = str(info.value)
    assert "step-00000004 (checkpoint " in message and "does not match the state being loaded)" in message
    assert "t/head: saved" in message and "t/new_bias: missing" in message and "t/old: in the checkpoint" in message
    assert "checkpoint.exclude" in message
    assert (state.state["a"] == -7).all() and state.state["lr"] == 0.1


def test_strict_load_with_exclude_loads_the_rest_and_keeps_the_excluded(root):
    state = TensorState(loading())
    head, new_bias = state.state["head"], state.state["new_bias"]
    assert load(root, state, exclude=["t/head", "t/new_*", "t/old"]) == 4
    expected = saved()
    assert torch.equal(state.state["a"], expected["a"]) and torch.equal(state.state["norm"], expected["norm"])
    assert state.state["lr"] == 0.5  # the JSON state loads too
    assert state.state["head"] is head and (head == -7).all()  # kept, although the checkpoint has one
    assert state.state["new_bias"] is new_bias and (new_bias == -7).all()
    assert "old" not in state.state


def test_an_excluded_tensor_that_would_load_keeps_its_value(root):
    """Excluded by a glob although its shape matches: the checkpoint's value is not read into it."""
    state = TensorState({**saved(), "norm": torch.full((4,), -7.0), "a": torch.full((3, 4), -7.0)})
    assert load(root, state, exclude=["t/no*"]) == 4
    assert (state.state["norm"] == -7).all()
    assert torch.equal(state.state["a"], saved()["a"]) and torch.equal(state.state["head"], saved()["head"])
