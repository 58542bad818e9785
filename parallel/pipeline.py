"""Pipeline parallelism: cut the model into stages and drive them with a torch schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

SCHEDULES = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B}


def stage_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous, as-even-as-possible layer ranges; earlier stages take the remainder."""
    if n_layers < n_stages:
        raise ValueError(
            f"model.n_layers={n_layers} cannot fill {n_stages} pipeline stages; "
            "lower parallel.pp or parallel.stages_per_rank"
        )
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for stage in range(n_stages):
        size = base + (1 if stage < extra else 0)
        bounds.append(list(range(start, start + size)))
        start += size
    return bounds


def stage_ids_of(pp_rank: int, *, pp: int, stages_per_rank: int) -> list[int]:
    """Stages of one pipeline rank: looped assignment (rank r owns r, r + pp, ...)."""
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def cut_stage(model: nn.Module, *, stage_id: int, n_stages: int) -> nn.Module:
    """Drop what stage `stage_id` does not own; names of what is kept do not change."""
    keep = {str(i) for i in stage_layers(len(model.layers), n_stages)[stage_id]}
    for layer_id in list(model.layers):
        if layer_id not in keep:
            del model.layers[layer_id]
    if stage_id != 0:
        model.tok_embeddings = None
    if stage_id != n_stages - 1:
        model.norm = None
        model.output = None
    return model


def check_microbatches(microbatches: int, *, pp: int) -> None:
    if microbatches < pp:
        raise ValueError(f"parallel.microbatches={microbatches} < parallel.pp={pp} leaves stages idle; raise it")


def set_accumulation(schedule: object, *, last: bool) -> None:
    """Before each of a step's accumulation passes: torch's schedules divide every `.grad` by their
    micro-batch count after each `step()`, so only the last pass may (else the earlier passes' gradients
    are divided again). A routed schedule scales through the loss instead and needs nothing."""
    if not getattr(schedule, "scales_through_loss", False):
        schedule.scale_grads = last  # type: ignore[attr-defined]


def build_schedule(
    modules: list[nn.Module],
    *,
    stage_ids: list[int],
    n_stages: int,
    pp_mesh: DeviceMesh,
    device: torch.device,
    schedule: str,
    microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """Wrap each local stage module and build the schedule that runs them."""
    check_microbatches(microbatches, pp=pp_mesh.size())
    group = pp_mesh.get_group()
    stages = [
        PipelineStage(module, stage_id, n_stages, device, group=group) for module, stage_id in zip(modules, stage_ids)
    ]
    cls = SCHEDULES[schedule]
    if schedule == "Interleaved1F1B":
        return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn)
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn)
