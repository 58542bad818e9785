"""A pipeline runtime whose micro-batches may take different routes through the stages (CheckFree+).

Torch's stock stages talk to stage_index ± 1 and its schedule IR has no peer field, so a swap of
stages cannot be expressed there. Here the peer is a property of (stage, micro-batch): a
`RoutedStage` answers `is_first` / `is_last` and builds its sends and receives for the micro-batch it
is working on, and a `RoutedSchedule` feeds torch's `_PipelineScheduleRuntime` a plan with the
transfers already placed (`routing.build_plan`). Torch's stage machinery (shape inference,
DTensor activations, FSDP2 unshard / reshard / reduce) is kept as is.

Losses are kept per micro-batch: a routed plan can finish micro-batch 13 before 12, and under
CheckFree+ the head's copy computes the losses of odd micro-batches; they are sent to the last
stage so `losses` holds every micro-batch, in order, on that rank alone, as with torch's schedules.

Copies (CheckFree+): stage 1 holds a copy of the embedding and stage n-2 a copy of the head. After
each step the two holders of a part swap the gradients they added during the step, point to point
over the pipeline group (no extra process group: creating one is collective over the world and
would be needed for every data/tensor-parallel coordinate), and both set before + (mine + theirs).
Addition is commutative, so the copies stay bitwise identical; only the step's own contribution is
swapped, so accumulation over several steps stays exact. Gradient-norm clipping must count the
copies once (`copy_parameters`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining.schedules import (
    FORWARD,
    FULL_BACKWARD,
    REDUCE_GRAD,
    RESHARD,
    UNSHARD,
    _Action,
    _ComputationType,
    _format_pipeline_order,
    _PipelineContext,
    _PipelineScheduleRuntime,
)
from torch.distributed.tensor import DTensor

from .pipeline import check_microbatches
from .routed_stage import CPU_WAIT_TIMEOUT, RoutedStage
from .routing import (
    PLANS,
    Op,
    build_plan,
    check_plan,
    embedding_holders,
    head_holders,
    routes_for,
)

# ---- the schedule ---------------------------------------------------------------------------------


class RoutedSchedule(_PipelineScheduleRuntime):
    """Runs one routed stage per rank with a GPipe or 1F1B plan, on the identity or the CheckFree+ route.

    `step(*args, target=..., losses=...)` behaves as torch's schedules: inputs are split into
    micro-batches, losses are appended in micro-batch order on the last stage's rank, and gradients
    are scaled by 1 / n_microbatches (through the loss, so steps accumulate exactly). Under
    CheckFree+, inputs are also needed where the embedding's copy lives and the target where the
    head's copy lives (`needs_inputs`, `needs_target`). `eval` always takes the identity route.
    Every rank must call `set_route` alike.
    """

    def __init__(
        self,
        stage: RoutedStage,
        *,
        n_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None,
        plan: str = "1F1B",
        route: str = "identity",
        copies: bool | None = None,
        extra_in_flight: int = 0,
        scale_grads: bool = True,
        wait_timeout: timedelta | None = None,
    ) -> None:
        if not isinstance(stage, RoutedStage):
            raise TypeError(f"RoutedSchedule runs a RoutedStage, got {type(stage).__name__}")
        if stage.group_size != stage.num_stages:
            raise ValueError(
                f"a routed pipeline runs one stage per rank: {stage.num_stages} stages on {stage.group_size} ranks"
            )
        if plan not in PLANS:
            raise ValueError(f"plan {plan!r}: a routed pipeline runs one of {PLANS}")
        super().__init__([stage], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
        self.stage = stage
        self.plan_name, self.extra_in_flight = plan, extra_in_flight
        self.copies = route != "identity" if copies is None else copies
        if self.copies and stage.num_stages < 2:
            raise ValueError("embedding and head copies live on a neighbouring stage: they need parallel.pp >= 2")
        self.wait_timeout = wait_timeout if wait_timeout is not None or stage.device.type != "cpu" else CPU_WAIT_TIMEOUT
        self._check_parts()
        self._plans: dict[str, dict[int, list[Op]]] = {}
        self._mb_losses: dict[int, torch.Tensor] = {}
        self._grad_before: dict[nn.Parameter, torch.Tensor] = {}
        self._return_outputs, self._loss_kwargs = True, None
        self.register_custom_function(FORWARD, self._forward)
        self.register_custom_function(FULL_BACKWARD, self._backward)
        self.register_custom_function(REDUCE_GRAD, self._reduce_grad)
        self.route, self.routes = "identity", []
        self.set_route(route)

    scales_through_loss = True  # gradients are scaled through each micro-batch's loss, never after a step

    # -- what this rank holds and needs -------------------------------------------------------------

    @property
    def needs_inputs(self) -> bool:
        """This rank holds an embedding: pass the batch's inputs to `step` here."""
        return self.stage.stage_index in embedding_holders(self._num_stages, copies=self.copies)

    @property
    def needs_target(self) -> bool:
        """This rank holds a head: pass the batch's target to `step` here."""
        return self.stage.stage_index in head_holders(self._num_stages, copies=self.copies)

    @property
    def reports_losses(self) -> bool:
        """`losses` is filled on this rank (the last stage's), with every micro-batch's loss."""
        return self.stage.stage_index == self._num_stages - 1

    def copy_parameters(self) -> list[nn.Parameter]:
        """Parameters on this rank that copy another rank's (leave them out of a global gradient norm)."""
        if not self.copies:
            return []
        s, n, parts, module = self.stage.stage_index, self._num_stages, self.stage.parts, self.stage.submod
        copied = []
        if s == embedding_holders(n, copies=True)[1]:
            copied += parts.parameters(module, parts.embedding)
        if s == head_holders(n, copies=True)[0]:
            copied += parts.parameters(module, parts.head)
        return copied

    def _check_parts(self) -> None:
        s, n, parts, module = self.stage.stage_index, self._num_stages, self.stage.parts, self.stage.submod
        for holders, names, what in (
            (embedding_holders(n, copies=self.copies), parts.embedding, "embedding"),
            (head_holders(n, copies=self.copies), parts.head, "head"),
        ):
            if s in holders and not parts.holds(module, names):
                raise ValueError(
                    f"stage {s} must hold the {what} ({', '.join(names)}): "
                    f"cut it with cut_routed_stage(copies={self.copies})"
                )

    # -- routes and plans -----------------------------------------------------------------------------

    def set_route(self, mode: str) -> None:
        """Route every following step: "identity" (stage order) or "checkfree_plus" (odd micro-batches swapped)."""
        routes = routes_for(mode=mode, n_stages=self._num_stages, n_microbatches=self._n_microbatches)
        if mode != "identity" and not self.copies:
            raise ValueError(f"route {mode!r} needs the embedding and head copies: build the schedule with copies=True")
        if mode not in self._plans:
            plan = build_plan(routes, plan=self.plan_name, extra_in_flight=self.extra_in_flight)
            check_plan(plan, routes)  # pure Python: a plan that could stall is refused before any rank waits
            self._plans[mode] = plan
        plan = self._plans[mode]
        self.stage.set_routes(routes)
        self.route, self.routes = mode, routes
        self.pipeline_order = {s: [_to_action(op) for op in ops if op.kind in ("F", "B")] for s, ops in plan.items()}
        self._prepare_schedule_with_comms({s: self._lowered(ops) for s, ops in plan.items()}, format="compute_comms")

    def _lowered(self, ops: list[Op]) -> list[_Action]:
        """A stage's plan with FSDP's unshard first, gradient reduction after the last backward's send, reshard last."""
        stage = ops[0].stage
        last = max(i for i, op in enumerate(ops) if op.kind == "B")
        if last + 1 < len(ops) and ops[last + 1] == Op("SEND_B", stage, ops[last].microbatch):
            last += 1
        body = [_to_action(op) for op in ops]
        return [
            _Action(stage, UNSHARD, None),
            *body[: last + 1],
            _Action(stage, REDUCE_GRAD, None),
            *body[last + 1 :],
            _Action(stage, RESHARD, None),
        ]

    def format_plan(self) -> str:
        """The current plan, one column per rank (for logs and error reports)."""
        return _format_pipeline_order(self.pipeline_order_with_comms)

    # -- one step ---------------------------------------------------------------------------------------

    def step(
        self,
        *args: Any,
        target: Any = None,
        losses: list | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One pass over a batch. Outputs are returned (last stage's rank) only on the identity route,
        where one rank runs the head for every micro-batch."""
        self._return_outputs = return_outputs and self.route == "identity"
        self._loss_kwargs = loss_kwargs
        training = self._has_backward
        if training and self.copies:
            self._remember_copy_grads()
        out = super().step(
            *args, target=target, losses=losses, return_outputs=self._return_outputs, loss_kwargs=loss_kwargs, **kwargs
        )
        if training and self.copies:
            self._sync_copy_grads()
        return out

    def eval(self, *args: Any, target: Any = None, losses: list | None = None, **kwargs: Any) -> Any:
        """Forward only, on the identity route (evaluation runs the model in order)."""
        mode = self.route
        if mode != "identity":
            self.set_route("identity")
        try:
            return super().eval(*args, target=target, losses=losses, **kwargs)
        finally:
            if mode != "identity":
                self.set_route(mode)

    def _forward(self, action: _Action, ctx: _PipelineContext) -> None:
        stage, mb = self.stage, action.microbatch_index
        self._assert_unsharded(stage)
        with stage.acting_on(mb):
            works = self.fwd_recv_ops.pop((stage.stage_index, mb), None)
            if not stage.is_first:
                assert works is not None, f"plan runs forward of micro-batch {mb} before receiving its input"
                self._wait(works, f"the activation of micro-batch {mb} from stage {stage.position().previous}")
            args = ctx.arg_mbs[mb] if stage.is_first else ()
            if stage.is_first and not args:
                raise ValueError(
                    f"stage {stage.stage_index} runs the embedding on micro-batch {mb} but step() got no inputs on "
                    "this rank: pass them wherever schedule.needs_inputs"
                )
            output = stage.forward_one_chunk(mb, args, ctx.kwarg_mbs[mb], save_forward_output=self._return_outputs)
            if stage.is_last and self._loss_fn is not None:
                if ctx.target_mbs is None:
                    raise ValueError(
                        f"stage {stage.stage_index} runs the head on micro-batch {mb} but step() got no target on "
                        "this rank: pass it wherever schedule.needs_target"
                    )
                self._mb_losses[mb] = self._compute_loss(output, ctx.target_mbs[mb], self._loss_kwargs)

    def _backward(self, action: _Action, ctx: _PipelineContext) -> None:
        stage, mb = self.stage, action.microbatch_index
        self._assert_unsharded(stage)
        works = self.bwd_recv_ops.pop((stage.stage_index, mb), [])
        if not stage.has_backward:
            return
        with stage.acting_on(mb):
            if not stage.is_last:
                self._wait(works, f"the gradient of micro-batch {mb} from stage {stage.position().next}")
            self.backward_counter[stage.stage_index] += 1
            stage.backward_one_chunk(
                mb,
                loss=self._scaled_loss(mb) if stage.is_last else None,
                full_backward=True,
                last_backward=self.backward_counter[stage.stage_index] == self._n_microbatches,
            )
            if stage.is_first:
                stage.bwd_cache.pop(mb, None)  # nobody upstream to send it to

    def _scaled_loss(self, mb: int) -> torch.Tensor:
        """The loss backward starts from. Scaling it (rather than `.grad` after the step, as torch does)
        leaves gradients that earlier steps accumulated untouched, so grad accumulation over steps is exact."""
        loss = self._mb_losses[mb]
        return loss / self._n_microbatches if self.scale_grads else loss

    def _reduce_grad(self, action: _Action, ctx: _PipelineContext) -> None:
        if self._has_backward:
            self.stage.perform_reduce_grad(1)  # FSDP's reduction; the 1 / n_microbatches is in the loss

    def _update_losses(self, stages: Any, losses: list | None) -> None:
        """Gather every micro-batch's loss on the last stage's rank, in micro-batch order."""
        self._internal_losses.clear()
        computed, self._mb_losses = self._mb_losses, {}
        if self._loss_fn is None:
            return
        last, here = self._num_stages - 1, self.stage.stage_index
        elsewhere: dict[int, list[int]] = defaultdict(list)
        for mb, route in enumerate(self.routes):
            if route[-1] != last:
                elsewhere[route[-1]].append(mb)
        if here != last:
            if here in elsewhere:
                values = torch.stack([computed[mb].detach() for mb in elsewhere[here]])
                self._wait(
                    [dist.isend(values, dst=self.stage.peer_rank(last), group=self.stage.group)], "sending losses"
                )
            return
        for holder, mbs in sorted(elsewhere.items()):
            like = computed[0]  # micro-batch 0 takes the identity route: its loss is computed here
            values = torch.empty((len(mbs), *like.shape), dtype=like.dtype, device=like.device)
            self._wait([dist.irecv(values, src=self.stage.peer_rank(holder), group=self.stage.group)], "losses")
            computed.update(zip(mbs, values))
        if losses is not None:
            losses.clear()
            losses.extend(computed[mb] for mb in range(self._n_microbatches))

    # -- copies ------------------------------------------------------------------------------------------

    def _copy_pairs(self) -> list[tuple[int, list[nn.Parameter]]]:
        """(partner stage, parameters) for each copied part this stage holds; embedding first on every rank."""
        s, n, parts, module = self.stage.stage_index, self._num_stages, self.stage.parts, self.stage.submod
        pairs = []
        for holders, names in (
            (embedding_holders(n, copies=True), parts.embedding),
            (head_holders(n, copies=True), parts.head),
        ):
            if s in holders:
                params = [p for p in parts.parameters(module, names) if p.requires_grad]
                pairs.append((holders[1 - holders.index(s)], params))
        return pairs

    def _remember_copy_grads(self) -> None:
        """Gradients already accumulated (grad_accum > 1) are equal on both holders: keep them aside."""
        self._grad_before = {
            p: _local(p.grad).clone() for _, params in self._copy_pairs() for p in params if p.grad is not None
        }

    def _sync_copy_grads(self) -> None:
        for partner, params in self._copy_pairs():
            if not params:
                continue
            mine = [self._added_grad(p) for p in params]
            theirs = [torch.empty_like(t) for t in mine]
            peer, group = self.stage.peer_rank(partner), self.stage.group
            ops = [dist.P2POp(dist.isend, t, peer, group) for t in mine]
            ops += [dist.P2POp(dist.irecv, t, peer, group) for t in theirs]
            self._wait(dist.batch_isend_irecv(ops), f"the gradients of the copies held with stage {partner}")
            for p, a, b in zip(params, mine, theirs):
                total = a + b  # the partner computes b + a: the same bits
                before = self._grad_before.pop(p, None)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _local(p.grad).copy_(total if before is None else before + total)
        self._grad_before.clear()

    def _added_grad(self, param: nn.Parameter) -> torch.Tensor:
        if param.grad is None:
            return torch.zeros_like(_local(param.detach()))
        before = self._grad_before.get(param)
        return _local(param.grad) if before is None else _local(param.grad) - before

    # -- waits ---------------------------------------------------------------------------------------------

    def _wait(self, works: Sequence[dist.Work], what: str) -> None:
        for work in works:
            if self.wait_timeout is None:
                work.wait()
                continue
            try:
                work.wait(self.wait_timeout)
            except RuntimeError as err:
                if "timed out" not in str(err).lower():
                    raise
                raise TimeoutError(
                    f"stage {self.stage.stage_index} waited more than {self.wait_timeout} for {what} "
                    f"(route {self.route!r}, plan {self.plan_name})"
                ) from err


def _to_action(op: Op) -> _Action:
    return _Action(op.stage, _ComputationType(op.kind), op.microbatch)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def build_routed_schedule(
    modules: list[nn.Module],
    *,
    stage_ids: list[int],
    n_stages: int,
    pp_mesh: DeviceMesh,
    device: torch.device,
    schedule: str,
    microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    route: str = "identity",
    copies: bool | None = None,
    extra_in_flight: int = 0,
) -> RoutedSchedule:
    """`pipeline.build_schedule`'s counterpart for routed pipelines (one stage per rank)."""
    if len(modules) != 1 or len(stage_ids) != 1:
        raise ValueError(f"a routed pipeline runs one stage per rank, got stages {stage_ids}: set stages_per_rank=1")
    check_microbatches(microbatches, pp=pp_mesh.size())
    stage = RoutedStage(modules[0], stage_ids[0], n_stages, device, group=pp_mesh.get_group())
    return RoutedSchedule(
        stage,
        n_microbatches=microbatches,
        loss_fn=loss_fn,
        plan=schedule,
        route=route,
        copies=copies,
        extra_in_flight=extra_in_flight,
    )
