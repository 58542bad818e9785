"""Pure planning: from every rank's fragments to arrays, chunk grids and who writes what, and
from a checkpoint plus target fragments to the chunks each rank reads.

No torch.distributed and no I/O, so workers, the keeper and the CLI compute identical plans.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CheckpointError, join_problems
from ..state.dtypes import storage_dtype
from ..state.layout import Box, Fragment, TensorLayout
from ..state.regions import place
from .codec import CRC_BYTES, ChunkCodec
from .grid import (
    DEFAULT_MAX_CHUNK_BYTES,
    DEFAULT_MAX_SHARD_BYTES,
    ChunkIndex,
    choose_grid,
    chunk_box,
    chunk_key,
    chunks_in,
    grid_shape,
)
from .shard import ShardShape

_SAFE = re.compile(r"[A-Za-z0-9._-]")


@dataclass(frozen=True)
class Piece:
    """A distinct box of a saved tensor, the ranks holding it, and the one that writes it."""

    box: Box
    writer: int
    holders: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {**self.box.to_json(), "writer": self.writer, "holders": list(self.holders)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Piece:
        return Piece(Box.from_json(data), int(data["writer"]), tuple(int(r) for r in data["holders"]))


@dataclass(frozen=True)
class ArrayPlan:
    """One stored tensor: its zarr array path, global shape, shard and chunk grids, and pieces."""

    name: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    shards: tuple[int, ...]  # one file each
    chunks: tuple[int, ...]  # the checksummed unit inside a shard
    pieces: tuple[Piece, ...]
    layout: TensorLayout  # as the lowest holding rank saw it, for inspection

    @property
    def shard_shape(self) -> ShardShape:
        return ShardShape.of(self.shards, self.chunks)

    def shard_indices(self) -> Iterable[ChunkIndex]:
        return chunks_in(Box((0,) * len(self.shape), self.shape), chunks=self.shards)

    def shard_box(self, index: ChunkIndex) -> Box:
        return chunk_box(index, shape=self.shape, chunks=self.shards)

    @property
    def itemsize(self) -> int:
        return storage_dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunks) * self.itemsize

    def chunk_indices(self) -> Iterable[ChunkIndex]:
        return chunks_in(Box((0,) * len(self.shape), self.shape), chunks=self.chunks)

    def chunk_box(self, index: ChunkIndex) -> Box:
        return chunk_box(index, shape=self.shape, chunks=self.chunks)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "shards": list(self.shards),
            "chunks": list(self.chunks),
            "pieces": [p.to_json() for p in self.pieces],
            "layout": self.layout.to_json(),
        }

    @staticmethod
    def from_json(name: str, data: dict[str, Any]) -> ArrayPlan:
        return ArrayPlan(
            name=name,
            path=str(data["path"]),
            shape=tuple(int(x) for x in data["shape"]),
            dtype=str(data["dtype"]),
            shards=tuple(int(x) for x in data["shards"]),
            chunks=tuple(int(x) for x in data["chunks"]),
            pieces=tuple(Piece.from_json(p) for p in data["pieces"]),
            layout=TensorLayout.from_json(data["layout"]),
        )


@dataclass(frozen=True)
class SavePlan:
    """Everything needed to create the arrays and let each rank write its chunks."""

    arrays: Mapping[str, ArrayPlan]
    world_size: int
    compression: str = "none"

    def writes_for(self, rank: int) -> list[tuple[ArrayPlan, Piece]]:
        return [(a, p) for a in self.arrays.values() for p in a.pieces if p.writer == rank]


def plan_save(
    fragments: Mapping[int, Sequence[Fragment]],
    *,
    world_size: int,
    compression: str = "none",
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> SavePlan:
    """Arrays and chunk ownership from all ranks' fragments (keyed by rank); the union is saved.

    A box held by several ranks (a plain tensor passed by several ranks, or Replicate axes) is
    written once, by the holder with the fewest bytes assigned so far, so replicated writes spread.
    """
    ChunkCodec.parse(compression)
    by_name: dict[str, list[Fragment]] = defaultdict(list)
    for rank in sorted(fragments):
        for f in fragments[rank]:
            if f.rank != rank:
                raise CheckpointError(f"tensor {f.layout.name!r}: fragment of rank {f.rank} passed as rank {rank}'s")
            by_name[f.layout.name].append(f)
    _check_names(by_name)
    problems: list[str] = []
    arrays: dict[str, ArrayPlan] = {}
    holders_of: dict[str, dict[Box, list[int]]] = {}
    for name in sorted(by_name):
        try:
            holders_of[name] = _distinct_boxes(name, by_name[name])
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointError("cannot save these tensors:\n" + join_problems(problems))
    load: dict[int, int] = defaultdict(int)
    jobs = [
        (box.numel * storage_dtype(by_name[n][0].layout.dtype).itemsize, n, box)
        for n, m in holders_of.items()
        for box in m
    ]
    writer: dict[tuple[str, Box], int] = {}
    for nbytes, name, box in sorted(jobs, key=lambda j: (-j[0], j[1], j[2].offsets)):
        chosen = min(holders_of[name][box], key=lambda r: (load[r], r))
        writer[(name, box)] = chosen
        load[chosen] += nbytes
    for name, boxes in holders_of.items():
        first = by_name[name][0].layout
        shards, chunks = choose_grid(
            first.shape,
            list(boxes),
            itemsize=storage_dtype(first.dtype).itemsize,
            max_chunk_bytes=max_chunk_bytes,
            max_shard_bytes=max_shard_bytes,
        )
        pieces = tuple(
            Piece(box, writer[(name, box)], tuple(sorted(holders)))
            for box, holders in sorted(boxes.items(), key=lambda kv: kv[0].offsets)
        )
        arrays[name] = ArrayPlan(name, array_path(name), first.shape, first.dtype, shards, chunks, pieces, first)
        try:
            _check_tiling(arrays[name])
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointError("cannot save these tensors:\n" + join_problems(problems))
    return SavePlan(arrays, world_size, ChunkCodec.parse(compression).spec)


@dataclass(frozen=True)
class ChunkRead:
    """One stored chunk a rank reads, and where its overlaps go in the rank's local data."""

    index: ChunkIndex  # in the array's chunk grid
    targets: tuple[tuple[Box, tuple[slice, ...]], ...]  # (global overlap, destination in local data)


@dataclass(frozen=True)
class ShardRead:
    """The chunks a rank reads from one shard file."""

    shard: ChunkIndex
    chunks: tuple[ChunkRead, ...]


@dataclass(frozen=True)
class ReadPlan:
    """Per rank, per tensor: the shards opened, the chunks read and the bytes they hold."""

    reads: Mapping[int, Mapping[str, tuple[ShardRead, ...]]] = field(default_factory=dict)
    chunk_bytes: Mapping[str, int] = field(default_factory=dict)

    def bytes_read(self, rank: int) -> int:
        return sum(self._bytes(n, r) for n, r in self.reads.get(rank, {}).items())

    def _bytes(self, name: str, reads: tuple[ShardRead, ...]) -> int:
        return sum(len(r.chunks) for r in reads) * self.chunk_bytes[name]

    def to_json(self) -> dict[str, Any]:
        return {
            str(rank): {
                name: {
                    "shards": [chunk_key(r.shard) for r in reads],
                    "chunks": sum(len(r.chunks) for r in reads),
                    "bytes": self._bytes(name, reads),
                }
                for name, reads in per.items()
            }
            for rank, per in self.reads.items()
        }


def chunk_reads(array: ArrayPlan, fragment: Fragment) -> tuple[ShardRead, ...]:
    """The chunks of `array` overlapping `fragment` (each read once even if several boxes need
    it), grouped by the shard file holding them."""
    targets: dict[ChunkIndex, list[tuple[Box, tuple[slice, ...]]]] = defaultdict(list)
    for box, local in fragment.pieces():
        for index in chunks_in(box, chunks=array.chunks):
            overlap = array.chunk_box(index).intersect(box) if box.sizes else box
            if overlap is None:
                continue
            targets[index].append((overlap, place(local, box, overlap)))
    shards: dict[ChunkIndex, list[ChunkRead]] = defaultdict(list)
    for index, t in sorted(targets.items()):
        shards[array.shard_shape.locate(index)[0]].append(ChunkRead(index, tuple(t)))
    return tuple(ShardRead(shard, tuple(reads)) for shard, reads in sorted(shards.items()))


def plan_reads(arrays: Mapping[str, ArrayPlan], targets: Iterable[Fragment]) -> ReadPlan:
    """What each target fragment's rank reads; targets naming tensors not saved are refused."""
    reads: dict[int, dict[str, tuple[ChunkRead, ...]]] = defaultdict(dict)
    missing = []
    for f in targets:
        array = arrays.get(f.layout.name)
        if array is None:
            missing.append(f.layout.name)
            continue
        if tuple(array.shape) != tuple(f.layout.shape):
            missing.append(f"{f.layout.name} (saved shape {array.shape}, target {f.layout.shape})")
            continue
        reads[f.rank][f.layout.name] = chunk_reads(array, f)
    if missing:
        raise CheckpointError("targets the checkpoint cannot serve:\n" + join_problems(sorted(set(missing))))
    return ReadPlan(dict(reads), {n: a.chunk_nbytes + CRC_BYTES for n, a in arrays.items()})


def array_path(name: str) -> str:
    """The zarr path for a tensor name: '/'-separated, each component made filesystem-safe."""
    parts = name.split("/")
    if not name or any(p == "" for p in parts):
        raise CheckpointError(f"tensor name {name!r} has an empty path component: rename the state key")
    return "/".join(_escape(p) for p in parts)


def _escape(part: str) -> str:
    out = "".join(c if _SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in part)
    if out in (".", "..", "zarr.json") or out.startswith("__"):
        out = "%" + f"{ord(out[0]):02X}" + out[1:]
    return out


def _check_names(by_name: Mapping[str, list[Fragment]]) -> None:
    """A tensor path may not also be a folder of another tensor (zarr: array vs group)."""
    paths = {array_path(n): n for n in by_name}
    clashes = [f"{paths[p]!r} is a prefix of {n!r}" for n in by_name for p in _prefixes(array_path(n)) if p in paths]
    if clashes:
        raise CheckpointError("tensor names clash (one is a path prefix of another):\n" + join_problems(clashes))


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _distinct_boxes(name: str, frags: list[Fragment]) -> dict[Box, list[int]]:
    first = frags[0]
    for f in frags[1:]:
        if (f.layout.shape, f.layout.dtype) != (first.layout.shape, first.layout.dtype):
            raise CheckpointError(
                f"tensor {name!r}: rank {first.rank} has shape {first.layout.shape} {first.layout.dtype} but rank "
                f"{f.rank} has {f.layout.shape} {f.layout.dtype}; every rank must describe the same global tensor"
            )
    boxes: dict[Box, list[int]] = defaultdict(list)
    for f in frags:
        for box in f.boxes():
            boxes[box].append(f.rank)
    return dict(boxes)


def _check_tiling(array: ArrayPlan) -> None:
    """Every chunk belongs to exactly one piece: the pieces tile the tensor without overlap."""
    if not array.shape:
        return
    owner = np.full(grid_shape(array.shape, array.shards), -1, dtype=np.int64)
    for i, piece in enumerate(array.pieces):
        region = tuple(
            slice(o // c, -(-(o + s) // c)) for o, s, c in zip(piece.box.offsets, piece.box.sizes, array.shards)
        )
        taken = owner[region]
        if (taken >= 0).any():
            other = array.pieces[int(taken[taken >= 0].flat[0])]
            raise CheckpointError(
                f"tensor {array.name!r}: box {piece.box} (ranks {list(piece.holders)}) overlaps box {other.box} "
                f"(ranks {list(other.holders)}); ranks must hold identical or disjoint parts of a tensor"
            )
        owner[region] = i
    if (owner < 0).any():
        gap = array.shard_box(tuple(int(x) for x in np.argwhere(owner < 0)[0]))
        raise CheckpointError(
            f"tensor {array.name!r}: no rank holds {gap} of global shape {array.shape}; the fragments do not tile "
            "the tensor: every shard must be passed by the rank that holds it"
        )
