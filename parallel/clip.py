"""Gradient-norm clipping with the true global norm across every mesh axis."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


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


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.nn.Parameter], *, max_norm: float, pp: int) -> torch.Tensor:
    """Clip in place to `max_norm` (0: only measure) and return the global L2 norm.

    One all-reduce over the whole world: each rank adds its local squares weighted by 1/copies, so
    sharded, replicated and pipeline-split parameters each count exactly once, whatever mix of
    meshes the parameters live on.
    """
    grads = [p.grad for p in params if p.grad is not None]
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        total += local.double().pow(2).sum() / _copies(grad, world_size, pp)
    if world_size > 1:
        dist.all_reduce(total)
    norm = total.sqrt().float()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            local.mul_(scale.to(local.dtype))
    return norm
