"""Gradients leave the device per subgroup as the backward pass finishes with them, not all at the step.

A parameter's post-accumulate-grad hook fires once per backward pass that reaches it (under FSDP2,
once its reduce-scatter has landed in the sharded gradient). Its gradient is final after as many
firings as it had in the previous step (gradient accumulation and pipeline microbatches fire it
several times), so a subgroup is copied to host memory the moment the last of its members reaches
that count, overlapping the rest of the backward pass. The count is only a hint: at the step, a copy
whose gradient changed since (a further firing, or any in-place write, seen by the tensor's version)
is taken again, so a wrong guess costs time and never a wrong number. Gradient clipping must not
scale gradients in place after they were copied: the optimizer applies the clip factor to the copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor


def local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The parameter's gradient as this rank's shard, or None when it has none or it is placed otherwise
    than the parameter (a redistribution is collective: those wait for the step)."""
    grad = param.grad
    if grad is None:
        return None
    if isinstance(grad, DTensor):
        if tuple(grad.placements) != tuple(param.placements):
            return None
        return grad.to_local()
    return grad


def _mark(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t._version


class EarlyGradients:
    """Watches the gradients of `members` (one list of parameters per subgroup) and calls
    `copy(index, grads)` with {id(param): local gradient} when a subgroup's gradients are final."""

    def __init__(self, members: Sequence[Sequence[torch.nn.Parameter]], copy: Callable[[int, dict], Any]) -> None:
        self.members = [list(ps) for ps in members]
        self.copy = copy
        self.subgroup_of = {id(p): i for i, ps in enumerate(self.members) for p in ps}
        self.fired: dict[int, int] = {}  # id(param) -> firings this step
        self.expected: dict[int, int] = {}  # id(param) -> firings the last step had
        self.waiting: list[int] = [0] * len(self.members)
        self.copied: dict[int, tuple[Any, dict[int, tuple[int, int]]]] = {}  # index -> (handle, marks)
        self.enabled = [True] * len(self.members)
        self.early = 0  # subgroups copied during the backward pass in the last step
        self._handles = [p.register_post_accumulate_grad_hook(self._arrived) for ps in self.members for p in ps]

    def set_enabled(self, enabled: Sequence[bool]) -> None:
        """Which subgroups to copy early this step (those updated on the device read the device's)."""
        self.enabled = list(enabled)

    def _arrived(self, param: torch.Tensor) -> None:
        key = id(param)
        n = self.fired[key] = self.fired.get(key, 0) + 1
        index = self.subgroup_of[key]
        want = self.expected.get(key, 0)
        if n > want:
            self.copied.pop(index, None)  # it moved after its copy (or the count is new): copy at the step
            return
        if n == want:
            self.waiting[index] -= 1
            if self.waiting[index] == 0 and self.enabled[index]:
                self._copy(index)

    def _copy(self, index: int) -> None:
        grads = {}
        for p in self.members[index]:
            grad = local_grad(p)
            if grad is None:
                if p.grad is not None:
                    return  # placed otherwise than its parameter: the whole subgroup waits for the step
                continue
            grads[id(p)] = grad
        handle = self.copy(index, grads)
        self.copied[index] = (handle, {key: _mark(g) for key, g in grads.items()})

    def take(self, index: int, grads: dict[int, torch.Tensor]) -> tuple[bool, Any]:
        """(True, the copy's handle) if subgroup `index` was copied early and none of `grads` (its live
        members' local gradients now) moved since; else (False, None): copy it now."""
        entry = self.copied.get(index)
        if entry is None:
            return False, None
        handle, marks = entry
        if marks.keys() != grads.keys() or any(marks[k] != _mark(g) for k, g in grads.items()):
            return False, None
        return True, handle

    def next_step(self) -> None:
        """This step's firings become the next step's expectation."""
        self.early = len(self.copied)
        self.expected, self.fired, self.copied = self.fired, {}, {}
        self.waiting = [sum(1 for p in ps if self.expected.get(id(p), 0) > 0) for ps in self.members]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
