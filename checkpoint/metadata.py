"""The checkpoint's JSON document: what was saved, how it was sharded, and the small train state.

Read with `json` only; every name and path in it is validated before any file is opened, so a
tampered document can neither unpickle anything nor point outside the checkpoint folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import crc32c

from .codec import ChunkCodec
from .errors import CheckpointError
from .plan import ArrayPlan, SavePlan

FORMAT = "resurgo-universal"
FORMAT_VERSION = 1
METADATA_FILE = "resurgo.json"
COMMITTED_FILE = "COMMITTED"


@dataclass(frozen=True)
class StateTrees:
    """Each saving rank's JSON-able (non-tensor) state, deduplicated: `trees[rank_tree[r]]` is rank r's."""

    trees: tuple[Any, ...] = ()
    rank_tree: tuple[int, ...] = ()

    @staticmethod
    def from_ranks(per_rank: list[Any]) -> StateTrees:
        keys = [json.dumps(t, sort_keys=True) for t in per_rank]
        unique = list(dict.fromkeys(keys))
        return StateTrees(tuple(json.loads(k) for k in unique), tuple(unique.index(k) for k in keys))

    def of_rank(self, rank: int) -> Any:
        return self.trees[self.rank_tree[rank]]


@dataclass(frozen=True)
class CheckpointMeta:
    step: int
    topology: Mapping[str, Any]
    compression: str
    arrays: Mapping[str, ArrayPlan]
    states: StateTrees = field(default_factory=StateTrees)
    format_version: int = FORMAT_VERSION

    @property
    def world_size(self) -> int:
        return int(self.topology["world_size"])

    @staticmethod
    def from_plan(plan: SavePlan, *, step: int, topology: Mapping[str, Any], states: StateTrees) -> CheckpointMeta:
        return CheckpointMeta(step, dict(topology), plan.compression, plan.arrays, states)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "step": self.step,
            "topology": dict(self.topology),
            "compression": self.compression,
            "tensors": {n: a.to_json() for n, a in sorted(self.arrays.items())},
            "state": {"trees": list(self.states.trees), "rank_tree": list(self.states.rank_tree)},
        }

    @staticmethod
    def from_json(data: Any, *, where: Path) -> CheckpointMeta:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not a resurgo checkpoint document (no format {FORMAT!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where} has format version {version!r}, newer than this resurgo reads ({FORMAT_VERSION}): "
                "upgrade resurgo to load it"
            )
        try:
            arrays = {str(n): ArrayPlan.from_json(str(n), a) for n, a in data["tensors"].items()}
            state = data.get("state", {})
            meta = CheckpointMeta(
                step=int(data["step"]),
                topology=dict(data["topology"]),
                compression=ChunkCodec.parse(str(data["compression"])).spec,
                arrays=arrays,
                states=StateTrees(tuple(state.get("trees", [])), tuple(int(i) for i in state.get("rank_tree", []))),
                format_version=version,
            )
            int(meta.topology["world_size"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{where} is malformed ({type(e).__name__}: {e}): the checkpoint is damaged") from e
        for name, array in arrays.items():
            check_inside(array.path, what=f"tensor {name!r}", where=where)
        return meta


def check_inside(path: str, *, what: str, where: Path) -> None:
    """Refuse a stored relative path that could resolve outside the checkpoint folder."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or "\x00" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise CheckpointError(
            f"{what} in {where} has path {path!r}, which points outside the checkpoint folder: "
            "the document is damaged or was tampered with; do not load it"
        )


def read_metadata(directory: Path) -> CheckpointMeta:
    """The validated document of a committed checkpoint folder."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist: check the path (or use checkpoint.resume=latest)")
    if not (directory / COMMITTED_FILE).is_file():
        raise CheckpointError(
            f"checkpoint {directory} has no {COMMITTED_FILE} marker: its save did not finish, so it is not valid; "
            "load an earlier checkpoint"
        )
    doc = directory / METADATA_FILE
    try:
        raw = doc.read_bytes()
        marker = json.loads((directory / COMMITTED_FILE).read_text())
        data = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {doc} ({e}): the checkpoint is damaged; load an earlier one") from e
    if not isinstance(marker, dict) or marker.get("metadata_crc32c") != crc32c.crc32c(raw):
        raise CheckpointError(
            f"{doc} does not match the checksum in its {COMMITTED_FILE} marker: the document was changed after "
            "the save; load an earlier checkpoint"
        )
    meta = CheckpointMeta.from_json(data, where=doc)
    real = os.path.realpath(directory)
    for name, array in meta.arrays.items():
        target = os.path.realpath(directory / array.path)
        if os.path.commonpath([real, target]) != real:
            raise CheckpointError(
                f"tensor {name!r} in {doc} resolves to {target}, outside the checkpoint folder (a symlink): "
                "do not load this checkpoint"
            )
    return meta
