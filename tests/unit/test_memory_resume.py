"""Resuming from the keeper's memory fills the training tensors in place, and only once every rank
has its snapshot mapped: one rank that cannot read its own leaves every rank's state as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resurgo.checkpoint.keeper.messages import Holdings, HoldingsReply
from resurgo.checkpoint.keeper.protocol import KeeperError
from resurgo.checkpoint.recovery.keeper_memory import KeeperMemory
from resurgo.checkpoint.snapshot.capture import StateCapture
from resurgo.checkpoint.state.flatten import flatten
from resurgo.checkpoint.state.stateful import ModelState


class TwoRanks:
    """This process as rank 0 of two; rank 1's contribution to every gather is given."""

    def __init__(self, other_error: str | None) -> None:
        self.other_error = other_error

    def all_gather(self, obj):
        return [obj, obj if isinstance(obj, list) else self.other_error]


def protection(
    comm: TwoRanks, model: nn.Module, snapshot: dict[str, torch.Tensor] | None
) -> tuple[KeeperMemory, list[str]]:
    requests: list[str] = []
    states = {"model": ModelState(model)}
    capture = StateCapture(states, rank=0)
    digest = capture.current_layout().digest

    def keeper(request, **_):
        requests.append(request.op.value)
        return HoldingsReply([4], digest) if isinstance(request, Holdings) else None

    source = KeeperMemory(comm=comm, rank=0, keeper=keeper, link=None, capture=capture)
    tree = flatten("model", states["model"].state_dict())[1]

    def mapped(step: int):
        if snapshot is None:
            raise KeeperError("rank 0's slot is gone")
        requests.append("read")
        return snapshot, {"model": tree}

    source._map_snapshot = mapped
    return source, requests


def test_a_snapshot_is_copied_into_the_live_tensors_and_unpinned() -> None:
    model = nn.Linear(512, 1024)
    weight = model.weight
    snapshot = {
        name: torch.full_like(t, 3.0) for name, t in flatten("model", ModelState(model).state_dict())[0].items()
    }
    p, requests = protection(TwoRanks(None), model, snapshot)
    resumed = p.restore()
    assert resumed is not None and resumed.step == 4
    assert model.weight is weight and (weight == 3.0).all() and (model.bias == 3.0).all()
    assert requests[-1] == "unpin"


@pytest.mark.parametrize("failing", ["other", "self"])
def test_one_rank_without_its_snapshot_leaves_every_state_untouched(failing: str) -> None:
    model = nn.Linear(512, 1024)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = {
        name: torch.full_like(t, 3.0) for name, t in flatten("model", ModelState(model).state_dict())[0].items()
    }
    comm = TwoRanks("rank 1: its keeper is gone" if failing == "other" else None)
    p, requests = protection(comm, model, snapshot if failing == "other" else None)
    assert p.restore() is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert requests.count("unpin") == requests.count("read")  # a mapped snapshot is always released
