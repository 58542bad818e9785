"""Small control messages between ranks as JSON bytes (never pickle), on a gloo group of their own.

Checkpoint collectives get their own group so they cannot interleave with training collectives,
and run on CPU whatever backend the default group uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import CheckpointError


@dataclass(frozen=True)
class Comm:
    """This process's rank and world, and the group control messages travel on (None: one process)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @staticmethod
    def create() -> Comm:
        """A gloo group over the default process group (collective), or a single process."""
        if not dist.is_available() or not dist.is_initialized():
            return Comm()
        return Comm(dist.get_rank(), dist.get_world_size(), dist.new_group(backend="gloo"))

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64), group=self.group)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(out, padded, group=self.group)
        return [json.loads(bytes(o[: int(s)].numpy())) for o, s in zip(out, sizes)]

    def agree(self, error: str | None, *, action: str) -> list[Any]:
        """Barrier that fails on every rank if it failed on any, with every rank's message."""
        errors = self.all_gather(error)
        raise_failures(errors, action=action)
        return errors


def raise_failures(errors: list[str | None], *, action: str) -> None:
    """Raise, naming each failed rank, if any entry of a gathered error list is set."""
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        detail = "\n".join(f"[rank {r}] {e}" for r, e in failed)
        raise CheckpointError(f"{action} failed:\n{detail}")
