"""The offloaded AdamW follows torch's AdamW exactly on the tiny model, whatever the split between
CPU and device, and shows checkpoints the same state."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from resurgo.checkpoint import ModelState, OptimizerState
from resurgo.checkpoint.snapshot.capture import StateCapture
from resurgo.parallel.clip import clip_grad_norms_
from resurgo.trainer.config import ModelConfig, OptimConfig, ScheduleConfig
from resurgo.trainer.model import Transformer
from resurgo.trainer.offload import OffloadedAdamW
from resurgo.trainer.offload_config import OffloadConfig
from resurgo.trainer.offload_kernels import deepspeed_available
from resurgo.trainer.optim import build_optimizer, lr_at, set_lr

STEPS = 6
CPU = torch.device("cpu")


def build(seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(ModelConfig())
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model


def optim_cfg(offload: OffloadConfig) -> OptimConfig:
    return OptimConfig(offload=offload, schedule=ScheduleConfig(warmup_steps=2))


def run(model: Transformer, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    """Steps `steps` of a run of STEPS steps: the batch and learning rate of each depend on its index only."""
    losses = []
    for step in steps:
        tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        set_lr(opt, lr_at(step, cfg=optim_cfg(OffloadConfig()), total_steps=STEPS))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train(offload: OffloadConfig, *, steps: int = STEPS) -> tuple[list[float], Transformer, torch.optim.Optimizer]:
    model = build()
    opt = build_optimizer(list(model.parameters()), optim_cfg(offload), device=CPU)
    return run(model, opt, range(steps)), model, opt


@pytest.fixture(scope="module")
def reference():
    return train(OffloadConfig())


def assert_same(got, want) -> None:
    losses, model, _ = got
    assert losses == want[0]
    for (name, p), q in zip(model.named_parameters(), want[1].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_offloaded_equals_adamw_bit_for_bit(reference, fraction):
    """Small subgroups (several per model): the CPU path, the device path and any mix of them."""
    got = train(OffloadConfig(cpu_impl="torch", mode="cpu", subgroup_mb=0.05, device_fraction=fraction))
    assert isinstance(got[2], OffloadedAdamW)
    assert len(got[2].subgroups) > 3
    assert got[2].plan.device_count == round(fraction * len(got[2].subgroups))
    assert_same(got, reference)


def test_auto_mode_equals_adamw(reference):
    got = train(OffloadConfig(cpu_impl="torch", mode="auto", subgroup_mb=0.05))
    assert got[2].plan.device_count == 0  # the "device" is the CPU here: streaming through it only adds copies
    assert_same(got, reference)


def test_checkpoint_sees_the_same_state(reference):
    """Same names, shapes, dtypes and values as AdamW's, in the flattened form checkpoints store."""
    _, model, opt = train(OffloadConfig(cpu_impl="torch", mode="cpu", subgroup_mb=0.05, device_fraction=0.5))
    got = OptimizerState(model, opt).state_dict()
    want = OptimizerState(reference[1], reference[2]).state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for fqn, fields in want["state"].items():
        assert fields.keys() == got["state"][fqn].keys()
        for field, value in fields.items():
            assert got["state"][fqn][field].dtype == value.dtype
            torch.testing.assert_close(got["state"][fqn][field], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "first, second",
    [
        (OffloadConfig(), OffloadConfig(cpu_impl="torch", mode="cpu", subgroup_mb=0.05)),
        (OffloadConfig(cpu_impl="torch", mode="cpu", subgroup_mb=0.05, device_fraction=1.0), OffloadConfig()),
    ],
    ids=["off -> on", "on -> off"],
)
def test_resume_switching_offload(reference, first, second):
    """State saved with offload on (off) loads into an optimizer with it off (on), through the checkpoint
    adapters, into fresh weights; the run then continues bit for bit as the uninterrupted one."""
    model, opt = build(), None
    opt = build_optimizer(list(model.parameters()), optim_cfg(first), device=CPU)
    losses = run(model, opt, range(3))
    resumed = build(seed=1)  # other weights: the load must overwrite them and any master copy
    new = build_optimizer(list(resumed.parameters()), optim_cfg(second), device=CPU)
    ModelState(resumed).load_state_dict(ModelState(model).state_dict())
    OptimizerState(resumed, new).load_state_dict(OptimizerState(model, opt).state_dict())
    losses += run(resumed, new, range(3, STEPS))
    assert_same((losses, resumed, new), reference)


def test_memory_snapshot_restores_in_place_bit_exact(reference, caplog):
    """A snapshot references the host-resident state itself (no copy in the training thread, no device
    round trip) and a restore writes into it; the master copy follows the restored parameters."""
    model = build()
    opt = build_optimizer(
        list(model.parameters()),
        optim_cfg(OffloadConfig(cpu_impl="torch", mode="cpu", subgroup_mb=0.05, device_fraction=0.5)),
        device=CPU,
    )
    losses = run(model, opt, range(3))
    capture = StateCapture({"model": ModelState(model), "optim": OptimizerState(model, opt)}, rank=0)
    with caplog.at_level(logging.INFO):
        capture.current_layout()
    assert "state_dict()" not in caplog.text  # every tensor was recognised as live state
    snapshot = capture.take(3)
    held = [t.clone() for t in snapshot.tensors]  # what the lazy copy would have put in memory
    run(model, opt, range(3, 5))  # the state moves on; then the process "restarts" from memory
    targets = capture.restore_targets()
    assert len(targets.tensors) == len(held)
    for target, value in zip(targets.tensors.values(), held):
        target.copy_(value)
    capture.load(targets, snapshot.tree)
    losses += run(model, opt, range(3, STEPS))
    assert_same((losses, model, opt), reference)


def test_bad_config_fails_at_start():
    with pytest.raises(ValueError, match="optim.offload.mode"):
        OffloadConfig(mode="gpu")
    with pytest.raises(ValueError, match="cpu_impl"):
        OffloadConfig(mode="cpu", cpu_impl="numpy")
    with pytest.raises(ValueError, match="subgroup_mb"):
        OffloadConfig(mode="cpu", subgroup_mb=0)
    with pytest.raises(ValueError, match="host memory"):
        OffloadConfig(mode="cpu", subgroup_mb=2**30)
    with pytest.raises(ValueError, match="device_fraction"):
        OffloadConfig(mode="auto", device_fraction=1.5)
    with pytest.raises(ValueError, match="supports optim.name=adamw only"):
        OptimConfig(name="sgd", offload=OffloadConfig(mode="cpu"))


def test_deepspeed_without_deepspeed_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ValueError, match="needs DeepSpeed"):
        OffloadConfig(mode="cpu", cpu_impl="deepspeed")


def run_accumulating(offload: OffloadConfig, *, accum: int) -> tuple[list[float], Transformer, torch.optim.Optimizer]:
    """STEPS steps of `accum` backward passes each, clipped as the trainer clips: an offloaded optimizer
    gets the clip factor and leaves the gradients on the device untouched."""
    model = build()
    opt = build_optimizer(list(model.parameters()), optim_cfg(offload), device=CPU)
    offloaded = isinstance(opt, OffloadedAdamW)
    losses, early = [], []
    for step in range(STEPS):
        tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(step))
        for x in tokens.chunk(accum):
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()) / accum
            loss.backward()
        norms = clip_grad_norms_({0: model.parameters()}, n_stages=1, max_norm=0.5, pp=1, in_place=not offloaded)
        if offloaded:
            opt.scale_gradients(norms.scale)
        set_lr(opt, lr_at(step, cfg=optim_cfg(OffloadConfig()), total_steps=STEPS))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        early.append(opt.metrics()["offload_early_subgroups"] if offloaded else 0)
    return losses, model, early


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_gradients_leave_during_backward_and_the_clip_applies_to_the_copies(accum, fraction):
    """From the second step on, every CPU-updated subgroup's gradients were copied to host memory by the
    backward pass itself (after its last accumulation pass); the numbers stay AdamW's bit for bit."""
    want = run_accumulating(OffloadConfig(), accum=accum)
    got = run_accumulating(
        OffloadConfig(cpu_impl="torch", mode="cpu", subgroup_mb=0.05, device_fraction=fraction), accum=accum
    )
    assert_same(got[:2] + (None,), want[:2] + (None,))
    model = build()
    on_cpu = sum(
        not d
        for d in build_optimizer(
            list(model.parameters()),
            optim_cfg(OffloadConfig(cpu_impl="torch", mode="cpu", subgroup_mb=0.05, device_fraction=fraction)),
            device=CPU,
        ).plan.on_device
    )
    assert on_cpu > 1 and got[2] == [0] + [on_cpu] * (STEPS - 1)


def test_a_gradient_changed_after_its_early_copy_is_copied_again(reference):
    """In-place clipping after the backward pass (torch's own clip_grad_norm_) moves the gradients the
    early copies were taken of: the step notices by their versions and copies them again."""
    got = train(OffloadConfig(cpu_impl="torch", mode="cpu", subgroup_mb=0.05))
    assert_same(got, reference)


@pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")
def test_deepspeed_cpu_adam_follows_adamw():
    """DeepSpeedCPUAdam's AVX kernel updates the offloaded buffers (compiled on first use): its own
    arithmetic, so equal to torch's AdamW within fp32 rounding rather than bit for bit."""
    losses, model, opt = train(OffloadConfig(cpu_impl="deepspeed", mode="cpu", subgroup_mb=0.05))
    assert "deepspeed" in type(opt._cpu_update).__name__.lower()
    ref_losses, ref_model, _ = train(OffloadConfig())
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
