"""The small train state every checkpoint carries besides tensors: step, topology, RNG, and what
wrote it (the model config and the library versions)."""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import platform
from typing import Any

import torch

from .optim import lr_scale_at


class TrainProgress:
    """Stateful step counter and per-rank RNG state, JSON-only so it never needs unpickling.

    RNG states are per rank; on another topology a rank has no saved twin, so its generators are
    re-derived deterministically from (seed, step, rank) instead.

    It also carries what CheckFree needs across a restart, the same on every rank: the learning-rate
    boosts of rebuilt stages and the last per-stage gradient norms that weigh a rebuild. Both are by
    stage id, so they are kept only when the run resumes with as many stages.
    """

    def __init__(
        self,
        *,
        seed: int,
        rank: int,
        topology: dict[str, int],
        model: dict[str, Any] | None = None,
        n_stages: int = 1,
    ) -> None:
        self.step, self.seed, self.rank, self.topology = 0, seed, rank, topology
        self.model = dict(model or {})  # recorded for readers of the checkpoint; shapes are checked per tensor
        self.restored_rng = False
        self.n_stages = n_stages
        self.lr_boosts: dict[int, tuple[float, int]] = {}  # stage -> (scale, first step it applies to)
        self.stage_grad_norms: list[float] = []  # by stage: the norms a CheckFree rebuild weighs neighbours by

    def lr_scale(self, stage: int, *, decay_steps: int) -> float:
        """The factor on the schedule's learning rate for `stage` at the current step (1: none)."""
        if stage not in self.lr_boosts:
            return 1.0
        scale, since = self.lr_boosts[stage]
        return lr_scale_at(self.step, scale=scale, since=since, decay_steps=decay_steps)

    def drop_spent_boosts(self, *, decay_steps: int) -> None:
        """Forget boosts that have decayed back to 1."""
        if decay_steps:
            self.lr_boosts = {s: b for s, b in self.lr_boosts.items() if self.step < b[1] + decay_steps}

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "topology": dict(self.topology),
            "rank": self.rank,
            "model": self.model,
            "versions": library_versions(),
            "checkfree": {
                "n_stages": self.n_stages,
                "lr_boosts": {str(s): list(b) for s, b in sorted(self.lr_boosts.items())},
                "stage_grad_norms": list(self.stage_grad_norms),
            },
        }
        state["cpu_rng"] = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.restored_rng = dict(state["topology"]) == self.topology and int(state["rank"]) == self.rank
        if self.restored_rng:
            torch.set_rng_state(_bytes_tensor(state["cpu_rng"]))
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(_bytes_tensor(state["cuda_rng"]))
        else:
            torch.manual_seed(self.seed * 1_000_003 + self.step * 4099 + self.rank)
        checkfree = state.get("checkfree") or {}  # absent from checkpoints written before it existed
        if int(checkfree.get("n_stages", -1)) == self.n_stages:
            self.lr_boosts = {int(s): (float(b[0]), int(b[1])) for s, b in checkfree.get("lr_boosts", {}).items()}
            self.stage_grad_norms = [float(n) for n in checkfree.get("stage_grad_norms", [])]
        else:
            self.lr_boosts, self.stage_grad_norms = {}, []


@functools.cache
def library_versions() -> dict[str, str]:
    """The versions of what writes a checkpoint, for whoever reads it much later."""
    versions = {"python": platform.python_version()}
    for name in ("resurgo", "torch", "numpy", "zarr", "numcodecs"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _bytes_tensor(encoded: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8)
