"""Stateful adapters for a model split into parts (pipeline stages) and their optimizers.

Names are the model's FQNs, which do not depend on FSDP/TP wrapping or on which stage holds a
layer, so a checkpoint taken on one topology loads on another. The optimizer's state is keyed by
parameter FQN ('state/<fqn>/exp_avg', 'param_groups/<fqn>/lr') for the same reason, and is
initialized before its first step so it can serve as a load template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..errors import CheckpointError

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
_SECTIONS = ("state", "param_groups")


def _parts(model_parts: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)


class ModelState:
    """The parameters and persistent buffers of all model parts on this rank, by FQN."""

    def __init__(self, model_parts: nn.Module | Sequence[nn.Module]) -> None:
        self.parts = _parts(model_parts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for part in self.parts:
            sd = get_model_state_dict(part)
            clash = out.keys() & sd.keys()
            if clash:
                raise CheckpointError(
                    f"model parts on this rank share names {sorted(clash)[:5]}: each FQN must live in one part"
                )
            out.update(sd)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for part in self.parts:
            current = get_model_state_dict(part)
            # A tensor a restore filled in place (in the parameter's own memory) needs no copy onto itself.
            todo = {
                k: state_dict[k] for k in current if k in state_dict and not _same_memory(state_dict[k], current[k])
            }
            if todo:
                set_model_state_dict(part, todo, options=StateDictOptions(strict=False))


class OptimizerState:
    """Optimizer state of every model part, one optimizer per part, keyed by parameter FQN."""

    def __init__(
        self,
        model_parts: nn.Module | Sequence[nn.Module],
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    ) -> None:
        self.parts = _parts(model_parts)
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if len(self.parts) != len(self.optimizers):
            raise CheckpointError(
                f"{len(self.parts)} model parts but {len(self.optimizers)} optimizers: pass one optimizer per part"
            )
        self._fqns: list[frozenset[str]] | None = None

    def state_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in _SECTIONS}
        for part, optim in zip(self.parts, self.optimizers):
            for key, value in get_optimizer_state_dict(part, optim, options=_FLAT).items():
                section, rest = key.split(".", 1)
                fqn, field = rest.rsplit(".", 1)
                out[section].setdefault(fqn, {})[field] = value
        return out

    def load_state_dict(self, state_dict: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        for part, optim, own in zip(self.parts, self.optimizers, self._names()):
            flat = {
                f"{section}.{fqn}.{field}": value
                for section in _SECTIONS
                for fqn, fields in state_dict.get(section, {}).items()
                if fqn in own
                for field, value in fields.items()
            }
            set_optimizer_state_dict(part, optim, flat, options=_FLAT)

    def _names(self) -> list[frozenset[str]]:
        """Each part's parameter FQNs, found once: a model's names stay as built, and finding them
        walks every module (as long as the rest of a load's bookkeeping)."""
        if self._fqns is None:
            self._fqns = [frozenset(get_model_state_dict(part).keys()) for part in self.parts]
        return self._fqns


def _same_memory(a: Any, b: Any) -> bool:
    """Whether two tensors (or DTensors) view the very same elements."""
    a, b = (t.to_local() if isinstance(t, DTensor) else t for t in (a, b))
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )
