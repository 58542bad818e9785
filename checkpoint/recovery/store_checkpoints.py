"""The last rung before a fresh start: the newest committed checkpoint in the universal store that
verifies (damaged newer ones are skipped and named), resharded onto this topology."""

from __future__ import annotations

from collections.abc import Callable

from ..store.checkpointer import Checkpointer
from .sources import Resumed


class StoreCheckpoints:
    name, label = "disk", "from disk"

    def __init__(self, checkpointer: Checkpointer, *, why_not_memory: Callable[[], str]) -> None:
        self.checkpointer, self.why_not_memory = checkpointer, why_not_memory

    def restore(self) -> Resumed | None:
        found = self.checkpointer.load_latest()
        if found is None:
            return None
        step, path, skipped = found
        damaged = f"; skipped {', '.join(skipped)}" if skipped else ""
        return Resumed(self.name, step, f"{path}; {self.why_not_memory()}{damaged}")
