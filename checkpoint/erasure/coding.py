"""The erasure setup of one run incarnation and how a node's coded stream is cut, as pure values:
what the workers tell every keeper (`ErasureSetup`), the k segments of a node's stream
(`NodeCoding`), reading them, and how a worker scales its own shares (`ShareRecipe`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import code as erasure
from .plan import ErasurePlan, plan_erasure


@dataclass(frozen=True)
class ErasureSetup:
    """What the workers of one run incarnation tell every keeper: who holds which ranks, and where."""

    token: str
    created: float  # wall clock at rank 0: the newest plan is the incarnation to recover
    secret: str
    nodes: tuple[str, ...]
    ranks: Mapping[str, tuple[int, ...]]  # node -> global ranks
    replicas: tuple[tuple[int, ...], ...]
    k: int
    m: int
    peers: Mapping[str, str]  # node -> keeper address
    world_size: int
    topology: Mapping[str, Any]
    every: int = 1  # code every n-th snapshot step: less traffic, up to n steps more lost with a node
    max_mb_s: float = 0.0  # cap on the parity traffic a keeper sends (0: none)
    site: str = "host"  # where shares of parity rows >= 1 are scaled (encode_site.py)

    def erasure(self) -> ErasurePlan:
        return plan_erasure(self.nodes, self.ranks, k=self.k, m=self.m, replicas=self.replicas)

    def to_json(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "created": self.created,
            "secret": self.secret,
            "nodes": list(self.nodes),
            "ranks": {n: list(r) for n, r in self.ranks.items()},
            "replicas": [list(r) for r in self.replicas],
            "k": self.k,
            "m": self.m,
            "peers": dict(self.peers),
            "world_size": self.world_size,
            "topology": dict(self.topology),
            "every": self.every,
            "max_mb_s": self.max_mb_s,
            "site": self.site,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ErasureSetup:
        return ErasureSetup(
            token=str(data["token"]),
            created=float(data["created"]),
            secret=str(data["secret"]),
            nodes=tuple(str(n) for n in data["nodes"]),
            ranks={str(n): tuple(int(r) for r in rs) for n, rs in data["ranks"].items()},
            replicas=tuple(tuple(int(r) for r in rs) for rs in data["replicas"]),
            k=int(data["k"]),
            m=int(data["m"]),
            peers={str(n): str(a) for n, a in data["peers"].items()},
            world_size=int(data["world_size"]),
            topology=dict(data["topology"]),
            every=int(data.get("every", 1)),
            max_mb_s=float(data.get("max_mb_s", 0.0)),
            site=str(data.get("site", "host")),
        )


@dataclass(frozen=True)
class NodeCoding:
    """How one node's coded stream (its coded ranks' slots end to end) is cut into k segments."""

    k: int
    sizes: tuple[tuple[int, int], ...]  # (rank, slot bytes) in stream order

    @property
    def total(self) -> int:
        return sum(n for _, n in self.sizes)

    @property
    def segment(self) -> int:
        """Every segment's stride; the last ones may be shorter (or empty)."""
        return -(-self.total // self.k) if self.k else 0

    def length(self, index: int) -> int:
        return max(0, min(self.segment, self.total - index * self.segment))

    def base(self, rank: int) -> int:
        """Where `rank`'s slot starts in the stream."""
        offset = 0
        for r, n in self.sizes:
            if r == rank:
                return offset
            offset += n
        raise KeyError(f"rank {rank} is not coded on this node")


def stream_read(parts: Sequence[np.ndarray], start: int, nbytes: int) -> np.ndarray:
    """Bytes [start, start+nbytes) of the concatenation of `parts`, zero beyond its end (a view, not a
    copy, when they lie inside one part)."""
    offset = 0
    for part in parts:
        if offset <= start and start + nbytes <= offset + part.size:
            return part[start - offset : start - offset + nbytes]
        offset += part.size
    out = np.zeros(nbytes, dtype=np.uint8)
    offset = 0
    for part in parts:
        lo, hi = max(start, offset), min(start + nbytes, offset + part.size)
        if lo < hi:
            out[lo - start : hi - start] = part[lo - offset : hi - offset]
        offset += part.size
    return out


def segment_read(coding: NodeCoding, parts: Sequence[np.ndarray], index: int, offset: int, nbytes: int) -> np.ndarray:
    """Bytes [offset, offset+nbytes) of segment `index` of a node's coded stream (its slots `parts`),
    zero beyond the segment's end as the parity computation saw them."""
    end = min(offset + nbytes, coding.length(index))
    piece = stream_read(parts, index * coding.segment + offset, max(0, end - offset))
    return np.concatenate([piece, np.zeros(nbytes - piece.size, dtype=np.uint8)]) if piece.size < nbytes else piece


@dataclass(frozen=True)
class ShareRecipe:
    """How a worker scales its slot's shares of parity rows 1..m-1 before handing them to the keeper
    (fault.erasure.encode=device): per byte range of the slot, one segment of its node's coded stream
    each, the coefficient of every such row. The shares lie row after row beside the slot."""

    token: str  # the incarnation whose plan it follows: shares of another one are not used
    nbytes: int  # the slot's: one row of shares
    ranges: tuple[tuple[int, int, tuple[int, ...]], ...]  # (start, stop, coefficients of rows 1..m-1)

    @property
    def rows(self) -> int:
        return len(self.ranges[0][2]) if self.ranges else 0

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, "nbytes": self.nbytes, "ranges": [[a, b, list(c)] for a, b, c in self.ranges]}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ShareRecipe:
        ranges = tuple((int(a), int(b), tuple(int(x) for x in c)) for a, b, c in data["ranges"])
        return ShareRecipe(str(data["token"]), int(data["nbytes"]), ranges)

    def scale(self, slot: np.ndarray, out: np.ndarray) -> None:
        """The shares of a slot already in host memory (a worker without a GPU)."""
        rows = [out[row * self.nbytes : (row + 1) * self.nbytes] for row in range(self.rows)]
        for start, stop, coefficients in self.ranges:
            erasure.scale(slot[start:stop], coefficients, out=[row[start:stop] for row in rows])


def share_recipe(coding: NodeCoding, rank: int, *, m: int, token: str) -> ShareRecipe:
    """`rank`'s recipe when its node's coded stream is cut as `coding`: segment t's bytes enter
    parity p with coefficient G[p, t], as the holder's `accumulate` applies it."""
    matrix = erasure.parity_matrix(coding.k, m)
    base, size = coding.base(rank), dict(coding.sizes)[rank]
    ranges = []
    for t in range(coding.k):
        lo, hi = max(base, t * coding.segment), min(base + size, t * coding.segment + coding.length(t))
        if lo < hi:
            ranges.append((lo - base, hi - base, tuple(int(matrix[p, t]) for p in range(1, m))))
    return ShareRecipe(token, size, tuple(ranges))
