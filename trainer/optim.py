"""AdamW and its learning-rate schedule (linear warmup, cosine decay)."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, *, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel where the device has one (CUDA and CPU), else foreach."""
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
        fused=device.type in ("cuda", "cpu"),
    )


def lr_at(step: int, *, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): a pure function of the step, nothing to save."""
    sched = cfg.schedule
    if step < sched.warmup_steps:
        return cfg.lr * (step + 1) / sched.warmup_steps
    decay_steps = sched.decay_steps or max(total_steps - sched.warmup_steps, 1)
    progress = min((step - sched.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (sched.min_lr_ratio + (1.0 - sched.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
