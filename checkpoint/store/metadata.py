"""The checkpoint's JSON document: what was saved, how it was sharded, and the small train state.

Read with `json` only; every name and path in it is validated before any file is opened, so a
tampered document can neither unpickle anything nor point outside the checkpoint folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import crc32c

from ..errors import CheckpointError
from .codec import ChunkCodec
from .save_plan import ArrayPlan, SavePlan

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
            _check_fields(data)
            arrays = {str(n): ArrayPlan.from_json(str(n), a) for n, a in data["tensors"].items()}
            state = data["state"]
            meta = CheckpointMeta(
                step=int(data["step"]),
                topology=dict(data["topology"]),
                compression=ChunkCodec.parse(str(data["compression"])).spec,
                arrays=arrays,
                states=StateTrees(tuple(state.get("trees", [])), tuple(int(i) for i in state.get("rank_tree", []))),
                format_version=version,
            )
            _check_arrays(meta)
            _check_states(meta)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            if isinstance(e, CheckpointError):
                raise CheckpointError(f"{where}: {e}: the checkpoint is damaged") from None
            raise CheckpointError(f"{where} is malformed ({type(e).__name__}: {e}): the checkpoint is damaged") from e
        for name, array in arrays.items():
            check_inside(array.path, what=f"tensor {name!r}", where=where)
        return meta


def _check_fields(data: dict[str, Any]) -> None:
    """The document's top-level fields have their types (the rest is checked as it is parsed)."""
    kinds = {"step": int, "topology": dict, "compression": str, "tensors": dict, "state": dict}
    for key, kind in kinds.items():
        if key not in data:
            raise CheckpointError(f"field {key!r} is missing")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise CheckpointError(f"field {key!r} is {type(data[key]).__name__}, not {kind.__name__}")
    if data["step"] < 0:
        raise CheckpointError(f"field 'step' is {data['step']}, not >= 0")
    if not isinstance(data["state"].get("trees"), list) or not isinstance(data["state"].get("rank_tree"), list):
        raise CheckpointError("field 'state' needs the lists 'trees' and 'rank_tree'")


def _check_arrays(meta: CheckpointMeta) -> None:
    for name, a in meta.arrays.items():
        dims = {"shape": a.shape, "shards": a.shards, "chunks": a.chunks}
        if len({len(d) for d in dims.values()}) != 1:
            raise CheckpointError(f"tensor {name!r}: shape, shards and chunks differ in rank {dims}")
        if any(n < 0 for n in a.shape) or any(n < 1 for n in (*a.shards, *a.chunks)):
            raise CheckpointError(f"tensor {name!r}: shape >= 0 and shards, chunks >= 1 in every dim, not {dims}")
        if any(s % c for s, c in zip(a.shards, a.chunks)):
            raise CheckpointError(f"tensor {name!r}: shards {a.shards} are not whole chunks {a.chunks}")


def _check_states(meta: CheckpointMeta) -> None:
    world, s = int(meta.topology["world_size"]), meta.states
    if world < 1:
        raise CheckpointError(f"field 'topology.world_size' is {world}, not >= 1")
    if len(s.rank_tree) != world or any(not 0 <= i < len(s.trees) for i in s.rank_tree):
        raise CheckpointError(
            f"field 'state.rank_tree' must give each of the {world} saving ranks one of the "
            f"{len(s.trees)} trees, not {list(s.rank_tree)[:8]}"
        )


def check_inside(path: str, *, what: str, where: Path) -> None:
    """Refuse a stored relative path that could resolve outside the checkpoint folder."""
    p = PurePosixPath(path)
    if (
        not path
        or p.is_absolute()
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise CheckpointError(
            f"{what} in {where} has path {path!r}, which points outside the checkpoint folder: "
            "the document is damaged or was tampered with; do not load it"
        )


def read_metadata(directory: Path) -> CheckpointMeta:
    """The validated document of a committed checkpoint folder."""
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint {directory} does not exist: check the path (or use checkpoint.resume=latest)"
        )
    if not (directory / COMMITTED_FILE).is_file():
        raise CheckpointError(
            f"checkpoint {directory} has no {COMMITTED_FILE} marker: its save did not finish, so it is not valid; "
            "load an earlier checkpoint"
        )
    doc = directory / METADATA_FILE
    try:
        marker = json.loads((directory / COMMITTED_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"the {COMMITTED_FILE} marker of {directory} is damaged ({e}); load an earlier checkpoint"
        ) from e
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        raise CheckpointError(
            f"the {COMMITTED_FILE} marker of {directory} is damaged (no step); load an earlier checkpoint"
        )
    try:
        raw = doc.read_bytes()
        data = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {doc} ({e}): the checkpoint is damaged; load an earlier one") from e
    if marker.get("metadata_crc32c") != crc32c.crc32c(raw):
        raise CheckpointError(
            f"{doc} does not match the checksum in its {COMMITTED_FILE} marker: the document was changed after "
            "the save; load an earlier checkpoint"
        )
    meta = CheckpointMeta.from_json(data, where=doc)
    named = re.fullmatch(r"step-(\d+)", directory.name)
    if marker["step"] != meta.step or (named and int(named.group(1)) != meta.step):
        raise CheckpointError(
            f"{doc} holds step {meta.step}, but its folder and {COMMITTED_FILE} marker say "
            f"{directory.name} and step {marker['step']}: the checkpoint was tampered with; load another"
        )
    real = os.path.realpath(directory)
    for name, array in meta.arrays.items():
        target = os.path.realpath(directory / array.path)
        if os.path.commonpath([real, target]) != real:
            raise CheckpointError(
                f"tensor {name!r} in {doc} resolves to {target}, outside the checkpoint folder (a symlink): "
                "do not load this checkpoint"
            )
    return meta
