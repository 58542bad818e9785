"""The cheapest rung: this node's keeper holds the newest snapshot of every rank of the same
topology, so the restore is plain copies from shared memory, checked by their checksums."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..comm import Comm
from ..keeper import messages as m
from ..keeper.client import KeeperLink
from ..keeper.protocol import KeeperError, KeeperGone
from ..snapshot.capture import StateCapture
from ..snapshot.engine import slot_views
from ..state import checksum
from ..state.slot_layout import SlotLayout
from .sources import KeeperRequest, Resumed

log = logging.getLogger(__name__)


class KeeperMemory:
    name, label = "memory", "from keeper memory"

    def __init__(
        self, *, comm: Comm, rank: int, keeper: KeeperRequest, link: KeeperLink, capture: StateCapture
    ) -> None:
        self.comm, self.rank, self.keeper, self.link, self.capture = comm, rank, keeper, link, capture

    def restore(self) -> Resumed | None:
        held = self.held()
        common = set.intersection(*[set(h) for h in self.comm.all_gather(held)])
        if not common:
            return None
        step = max(common)
        if self.restore_step(step) is None:
            return None
        return Resumed(self.name, step, f"newest step held by every rank's keeper; held here {sorted(held)}")

    def held(self) -> list[int]:
        """The steps this rank's keeper holds complete in this rank's layout now."""
        reply = self.keeper(m.Holdings(self.rank))
        # Snapshots of another layout (the topology changed) are for the peers' path, not this one.
        return reply.steps if reply and reply.digest == self.capture.current_layout().digest else []

    def restore_step(self, step: int, *, holds: bool = True) -> dict[str, Any] | None:
        """Collective: each rank that `holds` copies its snapshot of `step` into its live state and gets
        its JSON states back ({} on a rank that does not hold and only takes part). Every snapshot is
        mapped and checked before any tensor is overwritten: a rank that cannot read its own leaves
        every rank's state untouched (None on every rank) for the next source."""
        mapped, error = None, None
        if holds:
            try:
                mapped = self._map_snapshot(step)
            except (KeeperError, KeeperGone, checksum.ChecksumMismatch) as e:
                error = str(e)
        try:
            errors = [e for e in self.comm.all_gather(error) if e]
            if errors:
                if self.rank == 0:
                    log.warning("memory snapshot of step %d is unusable (%s): trying the next source", step, errors[0])
                return None
            if mapped is None:
                return {}
            views, trees = mapped
            targets = self.capture.restore_targets()
            for name, view in views.items():  # the layouts' digests agree: the same tensors, dtypes and shapes
                targets.tensors[name].copy_(view)
        finally:
            if mapped is not None:
                self.keeper(m.Unpin(self.rank, step))
        self.capture.load(targets, trees)
        return trees

    def _map_snapshot(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's tensors of `step` as views of the keeper's memory (pinned until "unpin"), and its JSON state."""
        reply: m.ReadReply = self.keeper(m.Read(self.rank, step), strict=True)
        try:
            layout = SlotLayout.from_json(reply.layout)
            current = self.capture.current_layout()
            if layout.digest != current.digest:
                raise KeeperError(
                    f"rank {self.rank}'s snapshot layout differs from its state now (the topology or model changed)"
                )
            if reply.segment is None:
                raise KeeperError(f"rank {self.rank}'s keeper holds only prefetched pieces of step {step}")
            segment = self.link.map([reply.segment])[0]
            if reply.checksums is not None:
                what = f"rank {self.rank}'s snapshot of step {step} in its keeper's memory"
                checksum.verify(segment.array(), layout, reply.checksums, what=what)
            views = slot_views(segment, layout)
        except BaseException:
            self.keeper(m.Unpin(self.rank, step))
            raise
        return {entry.name: view for entry, view in zip(layout.entries, views)}, reply.tree
