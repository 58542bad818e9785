"""Data parallelism: FSDP2 sharding (HSDP when replicas exist too), or plain replication."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def precision_policy(param_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Compute in `param_dtype`, reduce gradients in fp32 so small updates are not lost."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def apply_fsdp(
    model: nn.Module, dp_mesh: DeviceMesh, *, policy: MixedPrecisionPolicy, reshard_after_forward: bool
) -> None:
    """Shard every block, then the rest, over `dp_mesh` (1-D: FSDP; 2-D replicate x shard: HSDP).

    Blocks are wrapped one by one so only one block's parameters are gathered at a time. Under
    pipeline parallelism `reshard_after_forward` is off: each microbatch's backward would otherwise
    gather the same parameters again.
    """
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, *, policy: MixedPrecisionPolicy) -> None:
    """Replicate the model over `dp_mesh` and all-reduce its gradients (DDP, composable with TP)."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    replicate(model, mesh=dp_mesh, mp_policy=policy)
