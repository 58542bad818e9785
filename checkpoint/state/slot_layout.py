"""Where each tensor of one rank's snapshot lives in a host buffer (a keeper's slot): derived from the
same JSON on the worker and the keeper, so both read and write the same bytes."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError

ALIGN = 256  # bytes; keeps every tensor's host copy aligned for vectorized and DMA copies


@dataclass(frozen=True)
class Entry:
    """One tensor in a slot: its name, dtype (torch name), local shape and bytes, and its fragment."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    fragment: dict[str, Any]  # layout.Fragment.to_json(): where this local data sits in the global tensor

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "fragment": self.fragment,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Entry:
        return Entry(
            str(data["name"]),
            str(data["dtype"]),
            tuple(int(x) for x in data["shape"]),
            int(data["offset"]),
            int(data["nbytes"]),
            dict(data["fragment"]),
        )


@dataclass(frozen=True)
class SlotLayout:
    """Where each tensor of one rank's snapshot lives in a slot; identical on worker and keeper."""

    entries: tuple[Entry, ...]
    nbytes: int

    @staticmethod
    def build(tensors: Sequence[tuple[str, str, tuple[int, ...], int, dict[str, Any]]]) -> SlotLayout:
        """From (name, dtype, local shape, bytes, fragment json) in copy order."""
        entries, offset = [], 0
        for name, dtype, shape, nbytes, fragment in tensors:
            entries.append(Entry(name, dtype, tuple(shape), offset, nbytes, fragment))
            offset += -(-nbytes // ALIGN) * ALIGN
        return SlotLayout(tuple(entries), offset)

    @functools.cached_property
    def digest(self) -> str:
        """Equal digests mean a snapshot of one layout can be restored into the other by plain copies."""
        return hashlib.sha1(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"entries": [e.to_json() for e in self.entries], "nbytes": self.nbytes}

    @staticmethod
    def from_json(data: dict[str, Any]) -> SlotLayout:
        layout = SlotLayout(tuple(Entry.from_json(e) for e in data["entries"]), int(data["nbytes"]))
        end = max((e.offset + e.nbytes for e in layout.entries), default=0)
        if end > layout.nbytes or any(e.offset < 0 or e.nbytes < 0 for e in layout.entries):
            raise CheckpointError("a snapshot layout points outside its slot: the worker and keeper versions differ")
        return layout
