"""Tensor parallelism: Megatron-style column/row splits expressed as DTensor plans."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split attention heads and the MLP hidden dim across `tp_mesh`; the vocabulary too.

    Column-parallel projections feed row-parallel ones, so each block needs one all-reduce after
    attention and one after the MLP. The embedding is split over the vocabulary (row-wise) and the
    output head over the vocabulary too (column-wise, logits gathered), so the largest tensors are
    never replicated. Norm weights stay replicated: they see identical activations on every rank.
    """
    cfg = model.cfg
    for name, count in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.n_kv_heads)):
        if count % tp_mesh.size():
            raise ValueError(f"{name}={count} is not divisible by parallel.tp={tp_mesh.size()}")
    plan: dict[str, object] = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if model.output is not None:
        plan["output"] = ColwiseParallel(output_layouts=Replicate())
    for layer_id in model.layers:
        prefix = f"layers.{layer_id}"
        plan.update(
            {
                f"{prefix}.attention.wq": ColwiseParallel(),
                f"{prefix}.attention.wk": ColwiseParallel(),
                f"{prefix}.attention.wv": ColwiseParallel(),
                f"{prefix}.attention.wo": RowwiseParallel(),
                f"{prefix}.feed_forward.w1": ColwiseParallel(),
                f"{prefix}.feed_forward.w3": ColwiseParallel(),
                f"{prefix}.feed_forward.w2": RowwiseParallel(),
            }
        )
    parallelize_module(model, tp_mesh, plan)
