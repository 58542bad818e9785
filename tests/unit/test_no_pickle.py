"""Nothing in the load path unpickles: a checkpoint loads, and is verified and inspected, with every
unpickler of the process made to fail."""

from __future__ import annotations

import pickle

import torch
from test_ckpt_workers import TensorState

from resurgo.checkpoint.store.checkpointer import Checkpointer
from resurgo.launch.ckpt import main
from resurgo.trainer.config import CheckpointConfig


def test_a_checkpoint_loads_with_every_unpickler_disabled(tmp_path, monkeypatch, capsys):
    saved = {"w": torch.arange(96.0).reshape(12, 8), "step": torch.tensor(7)}
    Checkpointer(
        CheckpointConfig(keep=2, compression="zstd"),
        root=tmp_path,
        states={"model": TensorState(dict(saved)), "extra": TensorState({"lr": 0.1})},
    ).save(3)

    def refuse(*args, **kwargs):
        raise AssertionError("the load path unpickled something")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    model = TensorState({"w": torch.zeros(12, 8), "step": torch.tensor(0)})
    extra = TensorState({"lr": 0.0})
    assert (
        Checkpointer(CheckpointConfig(resume="latest"), root=tmp_path, states={"model": model, "extra": extra}).resume()
        == 3
    )
    assert torch.equal(model.state["w"], saved["w"]) and int(model.state["step"]) == 7 and extra.state["lr"] == 0.1
    assert main(["verify", str(tmp_path)]) == 0 and main(["inspect", str(tmp_path)]) == 0
    assert "unpickled" not in capsys.readouterr().err
