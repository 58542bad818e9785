"""The keeper's snapshot buffers for one rank, and which of them a new snapshot may overwrite.

Each rank gets a few equal slots. A slot is free, being written, or complete (every tensor and the
JSON state are in). A new snapshot never overwrites the rank's newest complete snapshot, the newest
step complete on every local rank (the one a restart would agree on while a slower rank is still
copying the next), nor a slot being persisted or restored. With three slots that always leaves one
to write into, except while a persist holds a slot; then a snapshot is skipped, or, for a step that
must be persisted, waits: host memory stays bounded and a slow disk shows up as backpressure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..state.slot_layout import Entry, SlotLayout
from .protocol import StoreTarget
from .shm import Segment, unlink

FREE, WRITING, COMPLETE = "free", "writing", "complete"
DEFAULT_SLOTS = 3


@dataclass
class Slot:
    index: int
    segment: Segment
    step: int = -1
    status: str = FREE
    tree: Any = None  # the rank's JSON train state of `step`, set when complete
    persist: bool = False  # persist once this step is complete on every local rank
    pins: int = 0  # persists and restores reading it; a pinned slot is never overwritten
    shares: Segment | None = None  # the worker's scaled parity shares of `step`, beside its bytes
    scaled: str = ""  # the incarnation whose recipe those shares follow; "" when there are none
    checksums: list[int] | None = None  # crc32c of each piece of `step` (checksum.py), set when complete

    def reset(self, status: str = FREE, step: int = -1) -> None:
        self.status, self.step, self.tree, self.persist, self.scaled, self.checksums = (
            status,
            step,
            None,
            False,
            "",
            None,
        )

    def share_space(self, name: Callable[[], str], nbytes: int) -> Segment:
        """The segment for `nbytes` of scaled shares, made anew (named by `name()`) when too small."""
        if self.shares is None or self.shares.size < nbytes:
            self.free_shares()
            self.shares = Segment.create(name(), nbytes)
        return self.shares

    def free_shares(self) -> None:
        if self.shares is not None:
            unlink(self.shares.name)
            self.shares.close()
            self.shares = None


@dataclass
class RankSlots:
    """One rank's layout and slots (all the same size)."""

    rank: int
    layout: SlotLayout
    token: str  # the run incarnation that registered it last
    slots: list[Slot] = field(default_factory=list)
    # The step the incarnation before `token` protected, when the layout carried over: its slot is not
    # overwritten while `token` has protected none (a node lost meanwhile is rebuilt from that step).
    earlier: int = -1

    @property
    def nbytes(self) -> int:
        return sum(s.segment.size + (s.shares.size if s.shares else 0) for s in self.slots)

    def complete_steps(self) -> list[int]:
        return sorted(s.step for s in self.slots if s.status == COMPLETE)

    def newest(self) -> int:
        return max(self.complete_steps(), default=-1)

    def find(self, step: int) -> Slot | None:
        return next((s for s in self.slots if s.status == COMPLETE and s.step == step), None)

    def views(self, slot: Slot) -> dict[str, tuple[Entry, np.ndarray]]:
        """Each tensor's bytes in `slot`, by name."""
        data = slot.segment.array()
        return {e.name: (e, data[e.offset : e.offset + e.nbytes]) for e in self.layout.entries}


def newest_common(ranks: Iterable[RankSlots]) -> int:
    """The newest step complete on every one of `ranks` (-1 if none)."""
    common: set[int] | None = None
    for r in ranks:
        steps = set(r.complete_steps())
        common = steps if common is None else common & steps
    return max(common or (), default=-1)


def choose_slot(ranks: RankSlots, *, keep: Iterable[int], keep_newest: bool = True) -> Slot | None:
    """A slot a new snapshot may overwrite: a free one, else the oldest complete one not kept or pinned.

    The newest complete one is kept too (`keep_newest`), so that a crash while writing leaves a
    snapshot as new as can be, unless the caller knows an older complete one stays whole meanwhile.
    """
    kept = set(keep) | ({ranks.newest()} if keep_newest else set())
    free = [s for s in ranks.slots if s.status == FREE and not s.pins]
    if free:
        return free[0]
    candidates = [s for s in ranks.slots if s.status == COMPLETE and not s.pins and s.step not in kept]
    return min(candidates, key=lambda s: s.step, default=None)


def free(slots: Iterable[Slot]) -> None:
    """Unlink and unmap `slots` (with their shares): their memory goes once no worker maps it."""
    for slot in slots:
        unlink(slot.segment.name)
        slot.segment.close()
        slot.free_shares()
        slot.status = FREE


@dataclass
class RankData:
    """One local rank's snapshot of the step being persisted: layout, slot bytes (pinned), JSON state."""

    layout: SlotLayout
    data: np.ndarray
    tree: Any


@dataclass
class PersistJob:
    step: int
    target: StoreTarget
    ranks: dict[int, RankData]
    committer: bool  # this keeper holds global rank 0 and commits
