"""The small train state every checkpoint carries besides tensors: step, topology, RNG, and what
wrote it (the model config and the library versions)."""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import platform
from typing import Any

import torch


class TrainProgress:
    """Stateful step counter and per-rank RNG state, JSON-only so it never needs unpickling.

    RNG states are per rank; on another topology a rank has no saved twin, so its generators are
    re-derived deterministically from (seed, step, rank) instead.
    """

    def __init__(self, *, seed: int, rank: int, topology: dict[str, int], model: dict[str, Any] | None = None) -> None:
        self.step, self.seed, self.rank, self.topology = 0, seed, rank, topology
        self.model = dict(model or {})  # recorded for readers of the checkpoint; shapes are checked per tensor
        self.restored_rng = False

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "topology": dict(self.topology),
            "rank": self.rank,
            "model": self.model,
            "versions": library_versions(),
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
