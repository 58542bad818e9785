"""The snapshot hook on one process: begin returns at once, fence waits for the copy only, a
snapshot is never torn (state changed in forward is taken at begin, later changes never leak in),
and the JSON state follows the optimizer's per-step hyperparameters."""

from __future__ import annotations

import time

import pytest
import torch
from test_keeper import serve  # noqa: F401  (fixture)
from torch import nn

from resurgo.checkpoint.keeper.client import EXTERNAL, KeeperLink
from resurgo.checkpoint.keeper.shm import Segment
from resurgo.checkpoint.snapshot.capture import StateCapture
from resurgo.checkpoint.snapshot.engine import HostCopier, Registration, SnapshotEngine, slot_views
from resurgo.checkpoint.state.flatten import flatten
from resurgo.checkpoint.state.stateful import ModelState, OptimizerState


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x))))


class Progress:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


class Ema:
    """State that is neither a parameter nor optimizer state: copied at every begin."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.avg = model, torch.zeros(4)

    def state_dict(self) -> dict:
        return {"avg": self.avg.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.avg = state["avg"]


class Setup:
    def __init__(self, keeper, *, slow_copy_s: float = 0.0) -> None:
        torch.manual_seed(0)
        self.model = Net()
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.progress, self.ema = Progress(), Ema(self.model)
        self.states = {
            "model": ModelState(self.model),
            "optim": OptimizerState(self.model, self.optim),
            "train": self.progress,
            "ema": self.ema,
        }
        self.link = KeeperLink(run_dir=keeper_run_dir(keeper), mode=EXTERNAL, local_rank=0)
        assert self.link.connect(wait_s=5)
        self.engine = SnapshotEngine(
            capture=StateCapture(self.states, rank=0),
            link=self.link,
            registration=Registration(rank=0, local_world_size=1, world_size=1, token="aa", store=None),
        )
        if slow_copy_s:
            self.engine.copier = SlowCopier(slow_copy_s)

    def train_step(self) -> None:
        """forward/backward (BatchNorm statistics change), fence, optimizer step, begin: as the trainer does."""
        self.model(torch.randn(8, 8)).square().mean().backward()
        self.engine.before_optimizer_step()
        self.optim.step()
        self.optim.zero_grad()
        self.progress.step += 1
        self.ema.avg += 1
        self.engine.after_optimizer_step(self.progress.step)

    def expected(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, trees = {}, {}
        for key, state in self.states.items():
            got, trees[key] = flatten(key, state.state_dict())
            tensors.update({n: t.detach().clone() for n, t in got.items()})
        return tensors, trees

    def held(self, step: int) -> tuple[dict[str, torch.Tensor], dict]:
        reply = self.link.request("read", rank=0, step=step)
        layout = self.engine.capture.layout
        views = slot_views(Segment.attach(reply["segment"]), layout)
        self.link.request("unpin", rank=0, step=step)
        return {e.name: v.clone() for e, v in zip(layout.entries, views)}, reply["tree"]


class SlowCopier(HostCopier):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def copy(self, dst, src, ready, **kwargs) -> None:
        time.sleep(self.delay_s)  # the next forward runs meanwhile
        super().copy(dst, src, ready, **kwargs)


def keeper_run_dir(keeper):
    return keeper.run_dir


@pytest.fixture
def keeper(serve, tmp_path):  # noqa: F811
    k = serve()
    k.run_dir = tmp_path / "run0"
    return k


def test_snapshot_is_never_torn(keeper):
    s = Setup(keeper, slow_copy_s=0.3)
    s.train_step()
    s.engine.fence()
    s.model.train()
    s.model(torch.randn(8, 8)).sum().backward()  # warm up the optimizer state and the statistics
    s.engine.before_optimizer_step()
    s.optim.step()
    s.progress.step += 1
    s.engine.after_optimizer_step(2)
    want_tensors, want_trees = s.expected()
    with torch.no_grad():
        s.model(torch.randn(8, 8))  # forward during the copy: BatchNorm running stats change
        s.ema.avg += 100
    s.engine.before_optimizer_step()  # fence: the copy of step 2 is done
    with torch.no_grad():  # the next optimizer step, and anything after, must not leak into step 2
        for t in [*s.model.parameters(), *(v for st in s.optim.state.values() for v in st.values())]:
            t.add_(1)
    s.progress.step = 99
    got_tensors, got_trees = s.held(2)
    assert got_trees == want_trees
    assert got_tensors.keys() == want_tensors.keys()
    for name, tensor in want_tensors.items():
        assert torch.equal(got_tensors[name], tensor), name
    assert "model/norm.running_mean" in got_tensors and "ema/avg" in got_tensors


def test_begin_returns_at_once_and_fence_waits_for_the_copy(keeper):
    s = Setup(keeper, slow_copy_s=0.5)
    s.train_step()  # first begin captures the layout
    s.engine.fence()
    s.train_step()
    assert s.engine.stats.begin_s < 0.1
    s.engine.before_optimizer_step()
    assert s.engine.stats.fence_s > 0.3
    assert s.engine.stats.copied == 2 and s.engine.stats.metrics()["snapshot_age"] == 0


def test_lazy_only_for_parameters_and_optimizer_state(keeper):
    s = Setup(keeper)
    s.train_step()
    capture = s.engine.capture
    eager = {src.name for src in capture._sources if src.eager}
    assert eager == {"model/norm.running_mean", "model/norm.running_var", "model/norm.num_batches_tracked", "ema/avg"}
    assert capture._volatile == ["ema"]


def test_json_follows_the_learning_rate_without_state_dict(keeper):
    s = Setup(keeper)
    s.train_step()
    s.engine.fence()
    for group in s.optim.param_groups:
        group["lr"] = 0.123
    taken = s.engine.capture.take(1)
    assert taken.tree["optim"] == flatten("optim", s.states["optim"].state_dict())[1]
    assert next(iter(taken.tree["optim"]["param_groups"].values()))["lr"] == 0.123


def test_replaced_optimizer_state_is_captured_afresh(keeper):
    s = Setup(keeper)
    s.train_step()
    s.engine.fence()
    s.optim.load_state_dict(s.optim.state_dict())  # new state tensors
    new = next(iter(s.optim.state.values()))["exp_avg"]
    taken = s.engine.capture.take(1)
    assert any(t.data_ptr() == new.data_ptr() for t in taken.tensors)


def test_external_keeper_missing_is_a_clear_error(tmp_path, monkeypatch):
    from resurgo.checkpoint.recovery import protection as recovery
    from resurgo.trainer.config import JobConfig

    monkeypatch.setattr(recovery, "CONNECT_WAIT_S", 0.2)
    cfg = JobConfig()
    cfg.fault.keeper = "external"
    model = Net()
    states = {"model": ModelState(model), "optim": OptimizerState(model, torch.optim.AdamW(model.parameters()))}
    with pytest.raises(ValueError, match="start `resurgo-keeper --run-dir"):
        recovery.Protection(
            cfg.checkpoint,
            cfg.fault,
            states=states,
            run_dir=tmp_path / "run",
            rank=0,
            local_rank=0,
            local_world_size=1,
            device=torch.device("cpu"),
            topology={},
        )


def test_an_optimizer_state_that_is_not_live_warns_once_and_is_still_captured(caplog):
    """A state_dict() that hands out copies cannot be captured lazily: the capture says so as a
    warning naming the tensor (not an INFO line), and still snapshots the right values."""
    from resurgo.checkpoint.snapshot.capture import StateCapture

    class CopyingOptimizerState(OptimizerState):
        def state_dict(self):
            copy = lambda v: (
                {k: copy(x) for k, x in v.items()}
                if isinstance(v, dict)
                else v.clone()
                if isinstance(v, torch.Tensor)
                else v
            )  # noqa: E731
            return copy(super().state_dict())

    model = Net()
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    optim.step()
    capture = StateCapture({"model": ModelState(model), "optim": CopyingOptimizerState(model, optim)}, rank=0)
    with caplog.at_level("INFO", logger="resurgo.checkpoint.snapshot.capture"):
        capture.current_layout()
        taken = capture.take(1)
    warnings = [
        r for r in caplog.records if r.levelname == "WARNING" and "is not one of its live optimizer" in r.message
    ]
    assert len(warnings) == 1 and "'optim'" in warnings[0].message
    assert capture._volatile == ["optim"]
    want = flatten("optim", CopyingOptimizerState(model, optim).state_dict())[0]
    got = {e.name: t for e, t in zip(capture.layout.entries, taken.tensors) if e.name.startswith("optim/")}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
