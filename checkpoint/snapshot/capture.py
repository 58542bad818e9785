"""What a snapshot holds, taken in the training thread in microseconds: tensor references and JSON.

Parameters and optimizer state change only inside `optimizer.step()`, so a snapshot may keep
references to them and copy later, until the next step. Anything else may change during forward
(persistent buffers such as BatchNorm statistics, or state a Stateful computes), so it is copied at
once. Which is which is decided by aliasing, not by names: a tensor is copied lazily only if its
memory is a parameter's or an optimizer state's. `state_dict()` of the model and optimizer is too
slow to call every step, so their tensors and JSON are captured once and the only per-step JSON,
the optimizer's hyperparameters (the learning rate), is re-read from the optimizer's groups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from ..state.dtypes import dtype_name
from ..state.flatten import TENSOR, flatten, restore
from ..state.layout import Fragment, fragment_of, local_data
from ..state.slot_layout import SlotLayout
from ..state.stateful import ModelState, OptimizerState

log = logging.getLogger(__name__)


@dataclass
class Captured:
    """One snapshot: tensors in layout order (the eager ones already copied) and the JSON per state."""

    step: int
    tensors: list[torch.Tensor]
    tree: dict[str, Any]


@dataclass
class RestoreTargets:
    """What a restore fills: every tensor's fragment and local data, which the restore overwrites in
    place, and for the states that then load through `load_state_dict` their templates and their
    tensors as their state_dict holds them (`originals`)."""

    fragments: dict[str, Fragment]
    tensors: dict[str, torch.Tensor]
    templates: dict[str, Any]
    originals: dict[str, torch.Tensor]


@dataclass
class _Source:
    """How to get one tensor at `take` time; `eager` ones are cloned there."""

    name: str
    get: Callable[[], torch.Tensor]
    eager: bool


class StateCapture:
    """Captures `states` (Stateful objects by key) for snapshots of one rank."""

    def __init__(self, states: Mapping[str, Any], *, rank: int) -> None:
        self.states, self.rank = dict(states), rank
        self.layout: SlotLayout | None = None
        self._sources: list[_Source] = []
        self._trees: dict[
            str, Callable[[dict[str, Any]], Any]
        ] = {}  # key -> tree, given the volatile keys' fresh trees
        self._volatile: list[str] = []  # keys whose state_dict() runs every take
        self._checks: list[Callable[[], bool]] = []
        self._fragments: dict[str, Fragment] = {}
        self._in_place: dict[
            str, Callable[[Any], None]
        ] = {}  # key -> loads its tree's JSON, its tensors filled in place

    def invalidate(self) -> None:
        """Forget the captured references (call after anything replaced parameters or optimizer state)."""
        self.layout = None

    def current_layout(self) -> SlotLayout:
        """The layout of the state as it is now (captured afresh when anything was replaced)."""
        if self.layout is None or not all(check() for check in self._checks):
            self._build()
        assert self.layout is not None
        return self.layout

    def take(self, step: int) -> Captured:
        self.current_layout()
        fresh: dict[str, torch.Tensor] = {}
        fresh_trees: dict[str, Any] = {}
        for key in self._volatile:
            tensors, fresh_trees[key] = flatten(key, self.states[key].state_dict())
            fresh.update(tensors)
        out = []
        for source in self._sources:
            tensor = fresh[source.name] if source.name in fresh else source.get()
            out.append(local_data(tensor).clone() if source.eager else tensor)
        return Captured(step, out, {key: build(fresh_trees) for key, build in self._trees.items()})

    # ---- restore ------------------------------------------------------------------------------

    def restore_targets(self) -> RestoreTargets:
        """The tensors a restore overwrites, with their fragments. Parameters and optimizer state are
        the captured live tensors themselves: no state_dict() is taken and no layout is derived again,
        and once they are filled `load` has only their JSON left to apply."""
        self.current_layout()
        targets = RestoreTargets({}, {}, {}, {})
        for source in self._sources:
            if source.name.split("/", 1)[0] in self._in_place:
                targets.tensors[source.name] = local_data(source.get())
                targets.fragments[source.name] = self._fragments[source.name]
        for key, state in self.states.items():
            if key not in self._in_place:
                targets.templates[key] = state.state_dict()
                for name, tensor in flatten(key, targets.templates[key])[0].items():
                    targets.originals[name], targets.tensors[name] = tensor, local_data(tensor)
                    targets.fragments[name] = fragment_of(name, tensor, rank=self.rank)
        return targets

    def load(self, targets: RestoreTargets, trees: Mapping[str, Any]) -> None:
        """Finish a restore whose `targets` hold the loaded values: the JSON of states filled in place,
        `load_state_dict` for the rest."""
        for key, state in self.states.items():
            if key in self._in_place:
                self._in_place[key](trees[key])
            else:
                state.load_state_dict(restore(trees[key], tensors=targets.originals, template=targets.templates[key]))

    # ---- classification, once ---------------------------------------------------------------

    def _build(self) -> None:
        self._sources, self._trees, self._volatile, self._checks, self._in_place = [], {}, [], [], {}
        self._unmatched = ""  # the first tensor of a model or optimizer that is not a live one
        specs = []
        for key, state in self.states.items():
            tensors, tree = flatten(key, state.state_dict())
            if isinstance(state, ModelState):
                sources, build, apply = self._model(state, tensors, tree)
            elif isinstance(state, OptimizerState):
                sources, build, apply = self._optimizer(state, tensors, tree)
            else:
                sources, build, apply = None, None, None
            if sources is None:
                if isinstance(state, (ModelState, OptimizerState)):
                    log.warning(
                        "state %r: tensor %r of its state_dict() is not one of its live %s, so every snapshot "
                        "takes a full state_dict() and copies it in the training thread (a custom state_dict or "
                        "optimizer?); the stall benchmark shows what that costs",
                        key,
                        self._unmatched,
                        "parameters or buffers" if isinstance(state, ModelState) else "optimizer tensors",
                    )
                sources, build, apply = *self._volatile_state(key, tensors), None
            self._sources += sources
            self._trees[key] = build
            if apply is not None:
                self._in_place[key] = apply
            for name, tensor in tensors.items():
                local = local_data(tensor)
                fragment = self._fragments[name] = fragment_of(name, tensor, rank=self.rank)
                specs.append(
                    (
                        name,
                        dtype_name(local.dtype),
                        tuple(local.shape),
                        local.numel() * local.element_size(),
                        fragment.to_json(),
                    )
                )
        order = {s.name: i for i, s in enumerate(self._sources)}
        specs.sort(key=lambda spec: order[spec[0]])
        self.layout = SlotLayout.build(specs)

    def _volatile_state(self, key: str, tensors: Mapping[str, torch.Tensor]):
        if tensors:
            self._volatile.append(key)
            log.info(
                "state %r is read with state_dict() and its tensors copied at every snapshot: they are not "
                "parameters or optimizer state, so they may change during forward",
                key,
            )
            return [_Source(n, _missing(n), eager=True) for n in tensors], lambda fresh_trees: fresh_trees[key]
        state = self.states[key]

        def build(_: dict[str, Any]) -> Any:
            got, tree = flatten(key, state.state_dict())
            if got:
                raise CheckpointError(
                    f"state {key!r} returned tensors after returning none: snapshots need a fixed set of tensors"
                )
            return tree

        return [], build

    def _model(self, state: ModelState, tensors: Mapping[str, torch.Tensor], tree: Any):
        params = {_identity(p): p for part in state.parts for p in part.parameters()}
        buffers = {
            _identity(b): (m, n)
            for part in state.parts
            for m in part.modules()
            for n, b in m.named_buffers(recurse=False)
            if b is not None
        }
        sources = []
        for name, tensor in tensors.items():
            ident = _identity(tensor)
            if ident in params or local_data(tensor).numel() == 0:
                sources.append(_Source(name, _const(local_data(tensor)), eager=False))
            elif ident in buffers:
                module, attr = buffers[ident]
                sources.append(_Source(name, lambda m=module, a=attr: getattr(m, a), eager=True))
            else:
                self._unmatched = name
                return None, None, None
        # Nothing but tensors (no extra state): filled in place, the model has nothing left to load.
        apply = _nothing if _only_tensors(tree) else None
        return sources, lambda _: tree, apply

    def _optimizer(self, state: OptimizerState, tensors: Mapping[str, torch.Tensor], tree: Any):
        live: dict[tuple, tuple[int, int, Any, str, torch.Tensor]] = {}
        for oi, opt in enumerate(state.optimizers):
            for gi, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    for field, value in opt.state.get(p, {}).items():
                        if isinstance(value, torch.Tensor):
                            live[_identity(value)] = (oi, gi, p, field, value)
        sources, group_of = [], {}
        for name, tensor in tensors.items():
            hit = live.get(_identity(tensor))
            if hit is None:
                self._unmatched = name
                return None, None, None
            oi, gi, p, field, value = hit
            sources.append(_Source(name, _const(local_data(tensor)), eager=False))
            self._checks.append(lambda o=state.optimizers[oi], p=p, f=field, v=value: o.state.get(p, {}).get(f) is v)
        by_name = {n: live[_identity(t)][:2] for n, t in tensors.items()}
        for fqn, fields in tree.get("state", {}).items():
            refs = [v[TENSOR] for v in fields.values() if isinstance(v, dict) and TENSOR in v]
            if refs:
                group_of[fqn] = by_name[refs[0]]
        groups = lambda: {
            (oi, gi): _group_json(g) for oi, o in enumerate(state.optimizers) for gi, g in enumerate(o.param_groups)
        }
        current = groups()
        for fqn, fields in tree.get("param_groups", {}).items():
            if fqn not in group_of:
                matches = [k for k, g in current.items() if g == fields]
                if len(matches) != 1:
                    return None, None, None
                group_of[fqn] = matches[0]

        def build(_: dict[str, Any]) -> Any:
            now = groups()
            return {**tree, "param_groups": {fqn: now[group_of[fqn]] for fqn in tree.get("param_groups", {})}}

        if build({}) != tree:
            return None, None, None  # the optimizer's JSON is not just its groups' hyperparameters

        def apply(loaded: Any) -> None:
            """The loaded hyperparameters into the groups of the parameters this rank holds."""
            for fqn, fields in loaded.get("param_groups", {}).items():
                if fqn in group_of:
                    oi, gi = group_of[fqn]
                    group = state.optimizers[oi].param_groups[gi]
                    for field, value in fields.items():
                        group[field] = restore(value, tensors={}, template=group.get(field))

        return sources, build, apply


def _nothing(_: Any) -> None:
    pass


def _only_tensors(tree: Any) -> bool:
    if isinstance(tree, dict):
        return set(tree) == {TENSOR} or all(_only_tensors(v) for v in tree.values())
    return isinstance(tree, list) and all(_only_tensors(v) for v in tree)


def _group_json(group: Mapping[str, Any]) -> Any:
    tensors, tree = flatten("group", {k: v for k, v in group.items() if k != "params"})
    return None if tensors else tree


def _identity(tensor: torch.Tensor) -> tuple:
    """Same memory, same extent: a state_dict entry that is this parameter or optimizer state."""
    local = local_data(tensor)
    return (local.data_ptr(), local.numel(), local.dtype, tuple(local.stride())) if local.numel() else (id(tensor),)


def _const(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


def _missing(name: str) -> Callable[[], torch.Tensor]:
    def get() -> torch.Tensor:
        raise CheckpointError(
            f"tensor {name!r} disappeared from its state between snapshots: snapshots need a fixed set of tensors"
        )

    return get
