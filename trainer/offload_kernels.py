"""The AdamW updates an offloaded optimizer can run on lists of tensors: torch's fused and foreach
kernels (the very functions `torch.optim.AdamW` calls, so the numbers equal a non-offloaded run's),
and DeepSpeedCPUAdam's AVX kernel when DeepSpeed is installed."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.optim.adamw import adamw

Update = Callable[..., None]  # (params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay)


def torch_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    fused: bool = True,
) -> None:
    if not params:
        return
    adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=not fused,
        fused=fused,
        amsgrad=False,
        beta1=betas[0],
        beta2=betas[1],
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


class DeepSpeedUpdate:
    """DeepSpeedCPUAdam's kernel on our own tensors: it keeps no state of its own beyond an id, so the
    moments and step stay in the offloaded buffers that checkpoints see."""

    def __init__(self) -> None:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        self._opt = DeepSpeedCPUAdam([torch.zeros(1)], adamw_mode=True, fp32_optimizer_states=True)

    def __call__(self, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay) -> None:
        kernel = self._opt.ds_opt_adam
        for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            s += 1
            kernel.adam_update(
                self._opt.opt_id, int(s.item()), lr, betas[0], betas[1], eps, weight_decay, True, p, g, m, v
            )


def deepspeed_built() -> bool:
    """DeepSpeedCPUAdam loads without compiling: built when DeepSpeed was installed (DS_BUILD_CPU_ADAM=1),
    or compiled once before into torch's extension cache."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    return (
        bool(installed_ops.get("cpu_adam")) or (Path(_get_build_directory("cpu_adam", False)) / "cpu_adam.so").exists()
    )


def cpu_updates(impl: str) -> dict[str, Update]:
    """The CPU updates that `impl` allows, by name; 'auto' picks among them by measured rate. 'auto'
    leaves DeepSpeed out while its kernel is not built: compiling it would stall the start by a minute
    or more ('deepspeed' compiles it once, into a cache that 'auto' then uses)."""
    out: dict[str, Update] = {}
    if impl in ("auto", "torch"):
        out["torch-fused"] = torch_update
    if impl == "deepspeed" or (impl == "auto" and deepspeed_available() and deepspeed_built()):
        out["deepspeed"] = DeepSpeedUpdate()
    if not out:
        raise ValueError("optim.offload.cpu_impl=deepspeed needs DeepSpeed (pip install deepspeed)")
    return out


def foreach_update() -> Update:
    return partial(torch_update, fused=False)


def fixed(update: Update) -> Callable[..., None]:
    """`update` with typical hyperparameters, for timing."""
    return partial(update, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
