"""AdamW and its learning-rate schedule (linear warmup, cosine decay), and what a pipeline stage rebuilt by
CheckFree needs of it: a fresh state and a scaled learning rate."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from .config import OptimConfig
from .offload import OffloadedAdamW


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: OptimConfig, *, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW with the fused kernel, one parameter group per mesh; with `optim.offload` its state in
    host memory (`OffloadedAdamW`), with the same groups, state names and numbers.

    A fused (or foreach) kernel takes all tensors of a group at once and refuses to mix plain
    tensors with DTensors or DTensors of different meshes, so parameters are grouped by mesh.
    """
    if cfg.offload.enabled:
        return OffloadedAdamW(
            mesh_groups(params),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            offload=cfg.offload,
            device=device,
        )
    return torch.optim.AdamW(
        mesh_groups(params),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device.type in ("cuda", "cpu"),
    )


def mesh_groups(params: list[torch.nn.Parameter]) -> list[dict]:
    groups: dict[object, list[torch.nn.Parameter]] = {}
    for param in params:
        groups.setdefault(getattr(param, "device_mesh", None), []).append(param)
    return [{"params": members} for members in groups.values()]


def lr_at(step: int, *, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): a pure function of the step, nothing to save."""
    sched = cfg.schedule
    if step < sched.warmup_steps:
        return cfg.lr * (step + 1) / sched.warmup_steps
    decay_steps = sched.decay_steps or max(total_steps - sched.warmup_steps, 1)
    progress = min((step - sched.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (sched.min_lr_ratio + (1.0 - sched.min_lr_ratio) * cosine)


def offload_metrics(optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
    """Subgroups updated on the device in the last step, over this rank's offloaded optimizers."""
    out: dict[str, float] = {}
    for optimizer in optimizers:
        if isinstance(optimizer, OffloadedAdamW):
            for key, value in optimizer.metrics().items():
                out[key] = out.get(key, 0.0) + value
    return out


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_scale_at(step: int, *, scale: float, since: int, decay_steps: int) -> float:
    """A boost of `scale` that began at optimizer step `since`: constant with `decay_steps`=0, else
    linear back to 1 over `decay_steps` steps."""
    if not decay_steps:
        return scale
    left = max(0.0, 1.0 - (step - since) / decay_steps)
    return 1.0 + (scale - 1.0) * left


@torch.no_grad()
def reset_state_(optimizer: torch.optim.Optimizer) -> None:
    """Give `optimizer` the state a new one starts from (AdamW: zero moments, step 0), in the same tensors.

    In place rather than cleared, so that whatever holds references to the live state (a snapshot in
    progress) sees the new values, and the next step runs exactly as a new optimizer's first step.
    """
    for state in optimizer.state.values():
        for field, value in state.items():
            if isinstance(value, torch.Tensor):
                (value.to_local() if isinstance(value, DTensor) else value).zero_()
            elif isinstance(value, (int, float)):
                state[field] = type(value)(0)


def adam_state(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> list[torch.Tensor]:
    """`param`'s AdamW state tensors (first and second moments, step), created as a new optimizer's
    first step would find them when absent: what a stage copied from its partner takes over."""
    if isinstance(optimizer, OffloadedAdamW):
        optimizer.ensure_state()  # its state lives in its host buffers, created for every parameter at once
    state = optimizer.state[param]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=_local(param).device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return [state["exp_avg"], state["exp_avg_sq"], state["step"]]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
