"""The small train state every checkpoint carries besides tensors: step, topology, RNG."""

from __future__ import annotations

import base64
from typing import Any

import torch


class TrainProgress:
    """Stateful step counter and per-rank RNG state, JSON-only so it never needs unpickling.

    RNG states are per rank; on another topology a rank has no saved twin, so its generators are
    re-derived deterministically from (seed, step, rank) instead.
    """

    def __init__(self, *, seed: int, rank: int, topology: dict[str, int]) -> None:
        self.step, self.seed, self.rank, self.topology = 0, seed, rank, topology
        self.restored_rng = False

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "topology": dict(self.topology), "rank": self.rank}
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


def _bytes_tensor(encoded: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8)
