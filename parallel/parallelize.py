"""Compose the parallelisms for the Llama model, in a fixed order, and materialize it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .activation import apply_activation_checkpointing
from .dims import ParallelDims
from .fsdp import apply_ddp, apply_fsdp, precision_policy
from .pipeline import build_schedule, cut_stage, stage_ids_of
from .routed import build_routed_schedule
from .routed_stage import cut_routed_stage
from .routing import embedding_holders, head_holders
from .tp import apply_tp


@dataclass
class ModelParts:
    """What one rank runs: its stage modules and, under pipeline parallelism, the schedule."""

    modules: list[nn.Module]
    schedule: object | None
    has_first_stage: bool  # this rank's schedule step takes the batch's inputs
    has_last_stage: bool  # and its targets

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]

    def copies(self) -> set[nn.Parameter]:
        """Parameters that copy another rank's (CheckFree+): a global gradient norm counts them once."""
        copy_parameters = getattr(self.schedule, "copy_parameters", None)
        return set(copy_parameters()) if copy_parameters is not None else set()


def parallelize(
    model: nn.Module, *, mesh: DeviceMesh, dims: ParallelDims, param_dtype: torch.dtype, activation_checkpoint: bool
) -> None:
    """TP first (it rewrites weights into DTensors), then activation checkpointing, then data parallelism.

    Data parallelism must come last: FSDP2 and replicate wrap whatever parameters they find,
    tensor-parallel DTensors included, into one 2-D layout. Without data parallelism, a one-rank
    FSDP2 still applies mixed precision (bf16 compute, fp32 master weights).
    """
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    if activation_checkpoint:
        apply_activation_checkpointing(model)
    policy = precision_policy(param_dtype)
    if dims.dp_shard > 1 or (dims.dp_replicate == 1 and param_dtype != torch.float32):
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        apply_fsdp(model, dp_mesh, policy=policy, reshard_after_forward=dims.pp == 1)
    elif dims.dp_replicate > 1:
        apply_ddp(model, mesh["dp_replicate"], policy=policy)


def build_model_parts(
    *,
    build: Callable[[], nn.Module],
    mesh: DeviceMesh,
    dims: ParallelDims,
    device: torch.device,
    param_dtype: torch.dtype,
    activation_checkpoint: bool,
    seed: int,
    pp_schedule: str,
    stages_per_rank: int,
    microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    materialize: bool = True,
    route: str = "identity",
) -> ModelParts:
    """Build on meta, cut into this rank's stages, parallelize, then materialize and init.

    `materialize=False` stops after parallelizing: the meta tensors still carry every shape and
    placement, which is all a layout preview needs.
    """
    if dims.pp == 1:
        stage_ids, n_stages = [0], 1
    else:
        n_stages = dims.pp * stages_per_rank
        stage_ids = stage_ids_of(mesh["pp"].get_local_rank(), pp=dims.pp, stages_per_rank=stages_per_rank)
    copies = route != "identity"
    cut = partial(cut_routed_stage, copies=True) if copies else cut_stage
    modules = []
    for stage_id in stage_ids:
        with torch.device("meta"):
            module = cut(build(), stage_id=stage_id, n_stages=n_stages)
        parallelize(module, mesh=mesh, dims=dims, param_dtype=param_dtype, activation_checkpoint=activation_checkpoint)
        if materialize:
            module.to_empty(device=device)
            module.init_weights(seed=seed)
        modules.append(module)
    schedule = None
    if dims.pp > 1 and materialize:
        schedule = (partial(build_routed_schedule, route=route) if copies else build_schedule)(
            modules,
            stage_ids=stage_ids,
            n_stages=n_stages,
            pp_mesh=mesh["pp"],
            device=device,
            schedule=pp_schedule,
            microbatches=microbatches,
            loss_fn=loss_fn,
        )
    first, last = (embedding_holders(n_stages, copies=copies), head_holders(n_stages, copies=copies))
    return ModelParts(
        modules=modules,
        schedule=schedule,
        has_first_stage=bool(set(first) & set(stage_ids)),
        has_last_stage=bool(set(last) & set(stage_ids)),
    )
