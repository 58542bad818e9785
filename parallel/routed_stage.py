"""The stage side of a routed pipeline (CheckFree+): a `RoutedStage` whose first / last role, sends
and receives depend on the route of the micro-batch it is working on, and the stage cut that keeps
the embedding and head copies (`cut_routed_stage`). The schedule that drives it is in routed.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._utils import _make_tensor_from_meta, to_local_if_dtensor
from torch.distributed.pipelining.stage import _RecvInfo

from .pipeline import cut_stage
from .routing import (
    Position,
    Route,
    embedding_holders,
    head_holders,
    position_in,
)

# CPU (gloo) waits get this deadline; on accelerators a timed wait would block the host, so the
# process group's own timeout (the NCCL watchdog) is the deadline there.
CPU_WAIT_TIMEOUT = timedelta(minutes=10)


# ---- the parts a route position adds around a stage's body ----------------------------------


@dataclass(frozen=True)
class StageParts:
    """Attribute names, on a stage module, of the parts only the first / last stage of a route runs.

    The model's forward skips a part that is None (as it does on a cut stage), so hiding a part for
    one call leaves it out of that micro-batch; names of what is kept never change, so checkpoints
    and FSDP see the same module whatever the route.
    """

    embedding: tuple[str, ...] = ("tok_embeddings",)
    head: tuple[str, ...] = ("norm", "output")

    def holds(self, module: nn.Module, names: Sequence[str]) -> bool:
        return all(getattr(module, name, None) is not None for name in names)

    def parameters(self, module: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
        return [p for name in names if (part := getattr(module, name, None)) is not None for p in part.parameters()]

    @contextlib.contextmanager
    def applying(self, module: nn.Module, *, embedding: bool, head: bool) -> Iterator[None]:
        """Run `module` with only the parts this position applies; the others are hidden meanwhile."""
        hidden = (() if embedding else self.embedding) + (() if head else self.head)
        saved = {name: getattr(module, name) for name in hidden if getattr(module, name, None) is not None}
        for name in saved:
            setattr(module, name, None)
        try:
            yield
        finally:
            for name, part in saved.items():
                setattr(module, name, part)


def cut_routed_stage(
    model: nn.Module, *, stage_id: int, n_stages: int, copies: bool, parts: StageParts = StageParts()
) -> nn.Module:
    """`cut_stage`, keeping the embedding on every embedding holder and the head on every head holder.

    With copies, stage 1 keeps the embedding and stage n-2 the head: the parts they run on the
    micro-batches where the route makes them first or last. Parameters are initialised by name, so
    a copy starts equal to its original.
    """
    keep = {}
    if stage_id in embedding_holders(n_stages, copies=copies):
        keep.update({name: getattr(model, name) for name in parts.embedding})
    if stage_id in head_holders(n_stages, copies=copies):
        keep.update({name: getattr(model, name) for name in parts.head})
    cut_stage(model, stage_id=stage_id, n_stages=n_stages)
    for name, part in keep.items():
        setattr(model, name, part)
    return model


# ---- the stage ------------------------------------------------------------------------------


class RoutedStage(PipelineStage):
    """A `PipelineStage` whose peers, and whether it runs the embedding or the head, follow each
    micro-batch's route.

    Torch's stage code asks `is_first` / `is_last`; here they answer for the micro-batch being worked
    on (`acting_on`), and for the identity route otherwise, which is what shape inference and the
    warm-up exchange (both along stage order) expect. Receive buffers are kept per micro-batch, as
    torch does; a micro-batch whose peer differs from the identity route's gets its own.
    """

    def __init__(
        self,
        submodule: nn.Module,
        stage_index: int,
        num_stages: int,
        device: torch.device,
        *,
        group: dist.ProcessGroup | None = None,
        parts: StageParts = StageParts(),
        **stage_kwargs: Any,
    ) -> None:
        self._acting: int | None = None
        self.routes: list[Route] = []
        self._identity_fwd: dict[int, tuple[_RecvInfo, ...]] = {}
        self._identity_bwd: dict[int, tuple[_RecvInfo, ...]] = {}
        super().__init__(submodule, stage_index, num_stages, device, group=group, **stage_kwargs)
        self.parts = parts

    # -- where this stage sits ----------------------------------------------------------------

    def position(self, microbatch: int | None = None) -> Position:
        """Neighbours on `microbatch`'s route (default: the micro-batch being worked on, else identity)."""
        mb = self._acting if microbatch is None else microbatch
        if mb is None or not self.routes:
            last = self.num_stages - 1
            return Position(
                previous=self.stage_index - 1 if self.stage_index > 0 else None,
                next=self.stage_index + 1 if self.stage_index < last else None,
            )
        return position_in(self.routes[mb], self.stage_index)

    @property
    def is_first(self) -> bool:
        return self.position().is_first

    @property
    def is_last(self) -> bool:
        return self.position().is_last

    @contextlib.contextmanager
    def acting_on(self, microbatch: int) -> Iterator[None]:
        """Answer for `microbatch` while torch's stage code runs for it."""
        outer, self._acting = self._acting, microbatch
        try:
            yield
        finally:
            self._acting = outer

    def set_routes(self, routes: Sequence[Route]) -> None:
        """Take new routes; receive buffers already built are rebuilt to match."""
        self.routes = list(routes)
        if self._identity_fwd:
            self._route_forward_recv()
        if self._identity_bwd:
            self._route_backward_recv()

    # -- the parts a position applies -----------------------------------------------------------

    def _applying(self, where: Position) -> contextlib.AbstractContextManager[None]:
        module, parts = self.submod, self.parts
        if where.is_first and not parts.holds(module, parts.embedding):
            raise ValueError(
                f"stage {self.stage_index} runs first on micro-batch {self._acting} but holds no embedding "
                f"({', '.join(parts.embedding)}): cut it with cut_routed_stage(copies=True)"
            )
        if where.is_last and not parts.holds(module, parts.head):
            raise ValueError(
                f"stage {self.stage_index} runs last on micro-batch {self._acting} but holds no head "
                f"({', '.join(parts.head)}): cut it with cut_routed_stage(copies=True)"
            )
        return parts.applying(module, embedding=where.is_first, head=where.is_last)

    def forward_maybe_with_nosync(self, *args: Any, **kwargs: Any) -> Any:
        with self._applying(self.position()):
            return super().forward_maybe_with_nosync(*args, **kwargs)

    def _compute_outputs(self, *args: torch.Tensor, module: nn.Module, **kwargs: Any) -> Any:
        # Shape inference runs outside any micro-batch: the identity route's parts.
        with self._applying(self.position()):
            return super()._compute_outputs(*args, module=module, **kwargs)

    # -- receive buffers per micro-batch ------------------------------------------------------------

    def _prepare_forward_infra(
        self, num_microbatches: int, args: Any, kwargs: dict[str, Any] | None = None, has_backward: bool = False
    ) -> Any:
        meta = super()._prepare_forward_infra(num_microbatches, args, kwargs, has_backward)
        self._identity_fwd = dict(self.args_recv_info)
        self._route_forward_recv()
        return meta

    def _prepare_backward_infra(self, num_microbatches: int, *args: Any, **kwargs: Any) -> Any:
        meta = super()._prepare_backward_infra(num_microbatches, *args, **kwargs)
        self._identity_bwd = dict(self.grad_recv_info)
        self._route_backward_recv()
        return meta

    def _activation_meta(self) -> Any:
        """Metadata of the one hidden-state tensor every stage boundary carries (swapped stages trade places)."""
        metas = self._stage_meta.outputs if self.stage_index == 0 else self._stage_meta.inputs
        if metas is None or len(metas) != 1:
            raise ValueError(
                f"stage {self.stage_index}: a routed stage passes exactly one activation tensor, got {metas}"
            )
        return metas[0]

    def _activation_grad_meta(self) -> Any:
        metas = (
            self._stage_meta.input_grads if self.stage_index == self.num_stages - 1 else self._stage_meta.output_grads
        )
        if metas is None or len(metas) != 1:
            raise ValueError(
                f"stage {self.stage_index}: a routed stage passes exactly one gradient tensor, got {metas}"
            )
        return metas[0]

    def _route_forward_recv(self) -> None:
        identity_previous = self.stage_index - 1 if self.stage_index > 0 else None
        for mb, identity in self._identity_fwd.items():
            where = self.position(mb)
            if where.previous == identity_previous:
                self.args_recv_info[mb] = identity
            elif where.is_first:
                self.args_recv_info[mb] = (_RecvInfo("root_input_0", None, None, None, is_root_arg=True),)
            else:
                meta = self._activation_meta()
                self.args_recv_info[mb] = (
                    _RecvInfo(
                        f"recv_for_{self.stage_index}_from_{where.previous}",
                        where.previous,
                        _make_tensor_from_meta(meta, self.device),
                        meta,
                    ),
                )

    def _route_backward_recv(self) -> None:
        identity_next = self.stage_index + 1 if self.stage_index < self.num_stages - 1 else None
        for mb, identity in self._identity_bwd.items():
            where = self.position(mb)
            if where.next == identity_next:
                self.grad_recv_info[mb] = identity
            elif where.is_last:
                self.grad_recv_info[mb] = ()
            else:
                meta = self._activation_grad_meta()
                buffer = _make_tensor_from_meta(meta, self.device) if meta is not None else None
                self.grad_recv_info[mb] = (
                    _RecvInfo(f"recv_grad_for_{self.stage_index}_from_{where.next}", where.next, buffer, meta),
                )

    # -- transfers, addressed by the route --------------------------------------------------------------

    def peer_rank(self, stage: int) -> int:
        """Global rank of `stage` (one stage per rank in a routed pipeline)."""
        return self._resolve_peer_global_rank(stage)

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        where = self.position(fwd_chunk_id)
        if where.is_last:
            return []
        outputs, _ = self.fwd_cache[fwd_chunk_id]
        peer = self.peer_rank(where.next)
        return [dist.P2POp(dist.isend, to_local_if_dtensor(out, detach=True), peer, self.group) for out in outputs]

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        with self.acting_on(bwd_chunk_id):
            return super().get_bwd_recv_ops(bwd_chunk_id)

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        if not self.has_backward:
            return []
        self._check_chunk_id(bwd_chunk_id)
        grads = self.bwd_cache.pop(bwd_chunk_id)
        where = self.position(bwd_chunk_id)
        if where.is_first:
            return []
        ops = []
        for grad, info in zip(grads, self.args_recv_info[bwd_chunk_id], strict=True):
            if info.is_root_arg:
                continue
            # The sender of this activation posted a receive for its gradient: always answer it.
            grad = torch.zeros_like(info.buffer) if grad is None else to_local_if_dtensor(grad)
            ops.append(dist.P2POp(dist.isend, grad, self.peer_rank(where.previous), self.group))
        return ops
