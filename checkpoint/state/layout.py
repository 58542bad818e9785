"""Where each rank's data sits inside a global tensor, as plain data.

A tensor is described by its global shape, dtype and placement on a mesh (`TensorLayout`). From that
description alone the fragment of any rank follows (`TensorLayout.fragment`): per dim, the global
index ranges the rank holds, in the order its local data stores them. That is pure Python, so a
process without torch.distributed (the keeper, the CLI) can derive the same boxes as the workers.
The semantics follow DTensor's: placements apply left to right over mesh axes, `Shard` splits like
`torch.chunk` (uneven sizes allowed, trailing ranks may be empty), `_StridedShard` first cuts the
dim into `split_factor` pieces and takes this rank's chunk of each. `fragment_of` checks the result
against the real local tensor's shape, so a DTensor whose semantics drift is refused, not guessed.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from .dtypes import dtype_name

Segment = tuple[int, int]  # [start, stop) in global indices along one dim


@dataclass(frozen=True)
class Box:
    """A rectangular region of a global tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def stops(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def intersect(self, other: Box) -> Box | None:
        starts = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        stops = tuple(min(a, b) for a, b in zip(self.stops, other.stops))
        if any(e <= s for s, e in zip(starts, stops)):
            return None
        return Box(starts, tuple(e - s for s, e in zip(starts, stops)))

    def slices(self, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
        """This box as slices, relative to `origin` (global coordinates) when given."""
        origin = origin or (0,) * len(self.offsets)
        return tuple(slice(o - b, o - b + s) for o, s, b in zip(self.offsets, self.sizes, origin))

    def to_json(self) -> dict[str, list[int]]:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Box:
        return Box(tuple(int(x) for x in data["offsets"]), tuple(int(x) for x in data["sizes"]))


@dataclass(frozen=True)
class Placement:
    """How one mesh axis places the tensor: 'replicate', 'shard' or 'strided_shard'."""

    kind: str
    dim: int = -1
    split_factor: int = 1

    def to_json(self) -> dict[str, Any]:
        if self.kind == "replicate":
            return {"kind": "replicate"}
        if self.kind == "shard":
            return {"kind": "shard", "dim": self.dim}
        return {"kind": self.kind, "dim": self.dim, "split_factor": self.split_factor}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Placement:
        kind = data.get("kind")
        if kind not in ("replicate", "shard", "strided_shard"):
            raise CheckpointError(f"unknown placement {data!r}: expected replicate, shard or strided_shard")
        return Placement(kind, int(data.get("dim", -1)), int(data.get("split_factor", 1)))

    def __str__(self) -> str:
        return {"replicate": "R", "shard": f"S({self.dim})"}.get(self.kind, f"SS({self.dim},{self.split_factor})")


@dataclass(frozen=True)
class MeshSpec:
    """A device mesh as data: axis names, sizes, and the global ranks in row-major order."""

    axes: tuple[str, ...]
    sizes: tuple[int, ...]
    ranks: tuple[int, ...]

    def coordinate(self, rank: int) -> tuple[int, ...] | None:
        """The rank's position on the mesh, None if it is not part of it."""
        try:
            flat = self.ranks.index(rank)
        except ValueError:
            return None
        coord = []
        for size in reversed(self.sizes):
            coord.append(flat % size)
            flat //= size
        return tuple(reversed(coord))

    def to_json(self) -> dict[str, list]:
        return {"axes": list(self.axes), "sizes": list(self.sizes), "ranks": list(self.ranks)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> MeshSpec:
        spec = MeshSpec(tuple(data["axes"]), tuple(int(x) for x in data["sizes"]), tuple(int(x) for x in data["ranks"]))
        if len(spec.axes) != len(spec.sizes) or math.prod(spec.sizes) != len(spec.ranks):
            raise CheckpointError(f"inconsistent mesh {data!r}: axes, sizes and ranks must agree")
        return spec


@dataclass(frozen=True)
class TensorLayout:
    """A tensor's global shape, dtype (torch name, e.g. 'float32') and placement; mesh None = plain."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    mesh: MeshSpec | None = None
    placements: tuple[Placement, ...] = ()

    def __post_init__(self) -> None:
        if self.mesh is None and self.placements:
            raise CheckpointError(f"tensor {self.name!r}: placements given without a mesh")
        if self.mesh is not None and len(self.placements) != len(self.mesh.sizes):
            raise CheckpointError(
                f"tensor {self.name!r}: {len(self.placements)} placements for a {len(self.mesh.sizes)}-axis mesh"
            )
        for p in self.placements:
            if p.kind != "replicate" and not 0 <= p.dim < len(self.shape):
                raise CheckpointError(
                    f"tensor {self.name!r}: placement {p} names dim {p.dim} of a {len(self.shape)}-d tensor"
                )
            if p.split_factor < 1:
                raise CheckpointError(f"tensor {self.name!r}: split_factor must be >= 1, got {p}")

    @property
    def ranks(self) -> tuple[int, ...] | None:
        """Ranks holding part of the tensor by placement; None for a plain tensor (any holder)."""
        return None if self.mesh is None else self.mesh.ranks

    def fragment(self, rank: int) -> Fragment:
        """What `rank` holds of this tensor; a plain tensor is held whole."""
        if self.mesh is None:
            return Fragment(self, rank, tuple(((0, n),) for n in self.shape))
        coord = self.mesh.coordinate(rank)
        if coord is None:
            raise CheckpointError(f"tensor {self.name!r}: rank {rank} is not on its mesh {self.mesh.ranks}")
        segments = []
        for d, n in enumerate(self.shape):
            segs: list[Segment] = [(0, n)]
            for axis, p in enumerate(self.placements):
                if p.kind == "replicate" or p.dim != d:
                    continue
                size, c = self.mesh.sizes[axis], coord[axis]
                if p.kind == "shard":
                    segs = _take(segs, _chunk(_length(segs), size, c))
                else:
                    pieces = [_take(segs, _chunk(_length(segs), p.split_factor, j)) for j in range(p.split_factor)]
                    segs = [s for piece in pieces for s in _take(piece, _chunk(_length(piece), size, c))]
            segments.append(tuple(_merge(segs)))
        return Fragment(self, rank, tuple(segments))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "mesh": None if self.mesh is None else self.mesh.to_json(),
            "placements": [p.to_json() for p in self.placements],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> TensorLayout:
        return TensorLayout(
            name=str(data["name"]),
            shape=tuple(int(x) for x in data["shape"]),
            dtype=str(data["dtype"]),
            mesh=None if data.get("mesh") is None else MeshSpec.from_json(data["mesh"]),
            placements=tuple(Placement.from_json(p) for p in data.get("placements", [])),
        )


@dataclass(frozen=True)
class Fragment:
    """What one rank holds of one tensor: per dim, global ranges in the order local data stores them."""

    layout: TensorLayout
    rank: int
    segments: tuple[tuple[Segment, ...], ...]

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(_length(segs) for segs in self.segments)

    def pieces(self) -> Iterator[tuple[Box, tuple[slice, ...]]]:
        """Each box of the global tensor held here, with where it lies in the local data."""
        return pieces(self.segments)

    def boxes(self) -> list[Box]:
        return [box for box, _ in self.pieces()]

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "layout": self.layout.to_json(),
            "segments": [[list(s) for s in segs] for segs in self.segments],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Fragment:
        segments = tuple(tuple((int(a), int(b)) for a, b in segs) for segs in data["segments"])
        return Fragment(TensorLayout.from_json(data["layout"]), int(data["rank"]), segments)


def pieces(segments: Sequence[Sequence[Segment]]) -> Iterator[tuple[Box, tuple[slice, ...]]]:
    """The boxes that per-dim global ranges (a fragment's `segments`, stored order) make up, with
    where each lies in the local data; in row-major order of the per-dim product, none when empty."""
    per_dim = []
    for segs in segments:
        local, start = [], 0
        for a, b in segs:
            local.append(((a, b), slice(start, start + b - a)))
            start += b - a
        per_dim.append(local)
    for combo in itertools.product(*per_dim):
        box = Box(tuple(s[0][0] for s in combo), tuple(s[0][1] - s[0][0] for s in combo))
        if box.numel or not box.sizes:
            yield box, tuple(s[1] for s in combo)


def layout_of(name: str, tensor: torch.Tensor) -> TensorLayout:
    """Describe a plain tensor or a DTensor; unknown placements (e.g. Partial) are refused."""
    from torch.distributed.tensor import DTensor

    dtype = dtype_name(tensor.dtype)
    if not isinstance(tensor, DTensor):
        return TensorLayout(name, tuple(tensor.shape), dtype)
    spec = mesh_spec(tensor.device_mesh)
    placements = tuple(_placement(name, p, spec.axes[i]) for i, p in enumerate(tensor.placements))
    return TensorLayout(name, tuple(tensor.shape), dtype, spec, placements)


_MESH_SPECS: dict[tuple[int, int], tuple[weakref.ref, MeshSpec]] = {}  # (id(mesh), rank) -> (the mesh, its spec)


def mesh_spec(mesh: Any) -> MeshSpec:
    """A DeviceMesh as data. Kept per mesh object and calling rank: a DeviceMesh rebuilds its rank
    tensor on every `.mesh`, which costs more than all the rest of describing a tensor, and every
    parameter shares a few meshes; torch reuses one sub-mesh object for the sub-meshes of different
    ranks (it answers for the rank asking), so the rank is part of the key."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    key = (id(mesh), rank)
    known = _MESH_SPECS.get(key)
    if known is not None and known[0]() is mesh:
        return known[1]
    names = mesh.mesh_dim_names or tuple(f"axis{i}" for i in range(mesh.ndim))
    spec = MeshSpec(tuple(names), tuple(mesh.shape), tuple(int(r) for r in mesh.mesh.flatten().tolist()))
    _MESH_SPECS[key] = (weakref.ref(mesh, lambda _, key=key: _MESH_SPECS.pop(key, None)), spec)
    return spec


def fragment_of(name: str, tensor: torch.Tensor, *, rank: int) -> Fragment:
    """This rank's fragment of `tensor`, checked against the shape of its real local data."""
    fragment = layout_of(name, tensor).fragment(rank)
    local = local_data(tensor)
    if tuple(local.shape) != fragment.local_shape:
        placements = ", ".join(str(p) for p in fragment.layout.placements)
        raise CheckpointError(
            f"tensor {name!r}: local shape {tuple(local.shape)} does not match placements [{placements}] of "
            f"global shape {fragment.layout.shape} (expected {fragment.local_shape}); this layout is not "
            "supported: redistribute the tensor to Shard/Replicate placements before checkpointing"
        )
    return fragment


def local_data(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `tensor` (a DTensor's local shard), detached from autograd."""
    from torch.distributed.tensor import DTensor

    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach()


def local_boxes(tensor: torch.Tensor, *, name: str = "tensor") -> list[Box]:
    """The boxes of the global tensor that this rank's local data covers."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return fragment_of(name, tensor, rank=rank).boxes()


def _placement(name: str, p: Any, axis: str) -> Placement:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(p, _StridedShard):
        return Placement("strided_shard", p.dim, p._split_factor_int())
    if isinstance(p, Shard):
        return Placement("shard", p.dim)
    if isinstance(p, Replicate):
        return Placement("replicate")
    raise CheckpointError(
        f"tensor {name!r} has placement {p} on mesh axis {axis!r}, which a checkpoint cannot store: "
        "redistribute it to Shard or Replicate (e.g. reduce a Partial) before saving"
    )


def _length(segs: Sequence[Segment]) -> int:
    return sum(b - a for a, b in segs)


def _chunk(length: int, n: int, index: int) -> tuple[int, int]:
    """Positions of piece `index` when `torch.chunk` splits `length` items into `n` pieces."""
    size = -(-length // n)
    start = min(index * size, length)
    return start, min(start + size, length)


def _take(segs: Sequence[Segment], window: tuple[int, int]) -> list[Segment]:
    """The global ranges at positions [lo, hi) of the concatenation of `segs`."""
    lo, hi = window
    out, pos = [], 0
    for a, b in segs:
        s, e = max(lo, pos), min(hi, pos + b - a)
        if s < e:
            out.append((a + s - pos, a + e - pos))
        pos += b - a
    return out


def _merge(segs: Sequence[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for a, b in segs:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out or [(0, 0)]
