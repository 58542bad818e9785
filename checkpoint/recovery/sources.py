"""The recovery ladder's rungs. A source restores the newest step it holds for every rank of this
topology, collectively, or says it holds none and leaves every rank's state untouched, so the
next source can try. `Protection.resume` walks them cheapest first; a new level is one new source
and one entry in that list."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# (request, *, strict=False) -> its typed reply (keeper/messages.py); None when no keeper answers, unless strict
KeeperRequest = Callable[..., Any]


@dataclass(frozen=True)
class Resumed:
    source: str  # a source's name ("memory", "peers", "disk"), or "safetensors" or "fresh"
    step: int  # 0 for a fresh start
    detail: str


class RecoverySource(Protocol):
    name: str  # what `Resumed.source` says when this source served
    label: str  # how the log says it: "from keeper memory"

    def restore(self) -> Resumed | None:
        """Collective. The newest step every rank can rebuild from here, restored; None when there
        is none (no rank's state touched)."""
        ...


def first_restored(sources: Sequence[RecoverySource]) -> tuple[Resumed, RecoverySource] | None:
    """Walk the ladder: the first source that restores a step, and what it restored."""
    for source in sources:
        if (resumed := source.restore()) is not None:
            return resumed, source
    return None
