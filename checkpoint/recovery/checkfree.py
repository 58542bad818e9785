"""The CheckFree rung: pipeline stages whose every rank lost its memory are rebuilt from their
neighbouring stages, with no copy of their own state anywhere.

The surviving ranks restore the newest step they all hold from their keepers' memory; the ranks of
the lost stages take the run's JSON state (data position, progress) from a survivor, and the
trainer's rebuild (`StageRebuild.rebuild`: the neighbours' norm-weighted average, a fresh optimizer,
a boosted learning rate) fills their parameters. What a stage holds is the trainer's knowledge,
handed here as data and callables: this package never imports the model or the parallel code.
Where it stands on the ladder is `fault.checkfree`: `fallback` after the peers and the store,
`always` right after the keeper's own memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..comm import Comm
from ..snapshot.capture import StateCapture
from .keeper_memory import KeeperMemory
from .sources import Resumed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRebuild:
    """What the trainer tells recovery about its pipeline stages."""

    stage_of_rank: tuple[int, ...]  # every rank's pipeline stage
    refusal: Callable[[Sequence[int]], str | None]  # why these lost stages cannot be rebuilt, None if they can
    rebuild: Callable[[Sequence[int]], list[str]]  # collective: rebuild them; a line per stage for the log
    donated: tuple[str, ...] = ("data", "train")  # JSON-only states a rebuilt rank takes from a survivor


class StageNeighbours:
    name, label = "checkfree", "CheckFree: lost pipeline stages rebuilt from their neighbours"

    def __init__(
        self, *, comm: Comm, rank: int, memory: KeeperMemory, stages: StageRebuild, capture: StateCapture
    ) -> None:
        self.comm, self.rank, self.memory, self.stages, self.capture = comm, rank, memory, stages, capture
        self.refused = ""  # why stages that lost every copy could not be rebuilt (a fresh start must not hide it)

    def restore(self) -> Resumed | None:
        everyone = self.comm.all_gather(self.memory.held())
        lost_ranks = [r for r, held in enumerate(everyone) if not held]
        if not lost_ranks or len(lost_ranks) == len(everyone):
            return None  # nothing lost (the keeper's memory or a lower rung serves), or everything
        lost, why = self._lost_stages(everyone)
        common = set.intersection(*[set(h) for h in everyone if h])
        why = why or ("" if common else "the surviving ranks hold no step in common")
        why = why or self.stages.refusal(lost) or ""
        if why:
            self.refused = (
                f"ranks {lost_ranks} (stages {lost}) lost their memory and CheckFree cannot rebuild them: {why}"
            )
            if self.rank == 0:
                log.warning("checkfree: %s", self.refused)
            return None
        step = max(common)
        trees = self.memory.restore_step(step, holds=self.rank not in lost_ranks)
        if trees is None:
            return None
        donor = min(r for r in range(len(everyone)) if r not in lost_ranks)
        shared = self.comm.all_gather({k: trees[k] for k in self.stages.donated} if self.rank == donor else None)
        if self.rank in lost_ranks:
            self._take(shared[donor])
        lines = self.stages.rebuild(lost)
        return Resumed(self.name, step, f"stages {lost} (ranks {lost_ranks}) lost their memory; {'; '.join(lines)}")

    def _lost_stages(self, everyone: list[list[int]]) -> tuple[list[int], str]:
        """The stages every rank of which lost its memory, and why not, when some rank of a stage kept it
        (a surviving replica, not the neighbours, is what that stage's other ranks should copy)."""
        of = self.stages.stage_of_rank
        lost = sorted({of[r] for r, held in enumerate(everyone) if not held})
        partial = [s for s in lost if any(everyone[r] for r in range(len(everyone)) if of[r] == s)]
        if partial:
            return lost, f"stages {partial} lost only some of their ranks; CheckFree rebuilds whole stages"
        return lost, ""

    def _take(self, trees: dict[str, Any]) -> None:
        """A rebuilt rank's run-wide JSON state, as its surviving neighbour has it."""
        for key, tree in trees.items():
            self.capture.states[key].load_state_dict(tree)
