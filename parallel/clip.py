"""Gradient-norm clipping with the true global norm across every mesh axis, and each pipeline stage's
share of it (CheckFree weighs a lost stage's neighbours by their own gradient norms)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


@dataclass
class GradNorms:
    """One step's gradient norms: the global one, and per pipeline stage before and after clipping.

    Clipping scales every gradient by the same factor, so a stage's norm after clipping is its norm
    before times that factor (no second reduction).
    """

    total: torch.Tensor  # global L2 norm before clipping, a 0-d float32 tensor
    stages: list[float]  # by stage id, before clipping
    clipped: list[float]  # by stage id, after clipping
    scale: torch.Tensor  # the factor clipping multiplies every gradient by (1 when nothing is clipped), 0-d


def _copies(grad: torch.Tensor, world_size: int, pp: int) -> int:
    """How many ranks hold each element of `grad`'s local data.

    Every rank outside a DTensor's mesh (except other pipeline stages) holds the same local data,
    and so does every rank along a Replicate axis of the mesh.
    """
    if not isinstance(grad, DTensor):
        return world_size // pp
    mesh = grad.device_mesh
    outside = world_size // (pp * mesh.size())
    replicated = math.prod(mesh.size(i) for i, p in enumerate(grad.placements) if isinstance(p, Replicate))
    return outside * replicated


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


@torch.no_grad()
def clip_grad_norms_(
    stage_params: Mapping[int, Iterable[torch.nn.Parameter]],
    *,
    n_stages: int,
    max_norm: float,
    pp: int,
    in_place: bool = True,
) -> GradNorms:
    """Clip in place to `max_norm` (0: only measure) and return the global and per-stage L2 norms.

    `in_place=False` leaves the gradients as they are and only returns the factor (`GradNorms.scale`):
    an optimizer that already copied the gradients elsewhere applies it there.

    `stage_params` holds this rank's parameters by the pipeline stage they belong to. One all-reduce
    over the whole world of [total, stage 0, ..., stage n-1]: each rank adds its local squares weighted
    by 1/copies, so sharded, replicated and pipeline-split parameters each count exactly once, whatever
    mix of meshes the parameters live on. The total keeps its own running sum in parameter order, so it
    is to the bit what it was before stages were counted apart.
    """
    grads = {stage: [p.grad for p in params if p.grad is not None] for stage, params in stage_params.items()}
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = next((g[0].device for g in grads.values() if g), torch.device("cpu"))
    sums = torch.zeros(1 + n_stages, dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for stage, stage_grads in grads.items():
        for grad in stage_grads:
            square = _local(grad).double().pow(2).sum() / _copies(grad, world_size, pp)
            total += square
            sums[1 + stage] += square
    sums[0] = total
    if world_size > 1:
        dist.all_reduce(sums)
    norm = sums[0].sqrt().float()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else torch.ones_like(norm)
    if max_norm > 0 and in_place:
        for stage_grads in grads.values():
            for grad in stage_grads:
                local = _local(grad)
                local.mul_(scale.to(local.dtype))
    stages = sums[1:].sqrt().tolist()
    factor = scale.item()
    return GradNorms(total=norm, stages=stages, clipped=[s * factor for s in stages], scale=scale)


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], *, max_norm: float, pp: int) -> torch.Tensor:
    """Clip in place to `max_norm` (0: only measure) and return the global L2 norm (all of `params`
    counted as one stage)."""
    return clip_grad_norms_({0: params}, n_stages=1, max_norm=max_norm, pp=pp).total
