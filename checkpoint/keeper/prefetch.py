"""Prefetch into a keeper, while its node's restarted workers build their model, the bytes they will read
from other nodes.

A restart after a node loss spends seconds in start-up and model build before any rank asks for
state, and the resharded restore then reads part of it over the network. As soon as a worker knows
its new rank and topology (the elastic policy's choice), it tells its keeper; the keeper derives from
the old ranks' slot layouts alone what that rank will hold (each tensor's placements on the new mesh,
`new_fragment`), plans the restore's copies exactly as the restore plans them (`plan_copies`), and
fetches (or decodes) every byte range its node does not hold whole into its own shared memory. The
restore then finds those ranges in place. A guess that turns out wrong (another topology, another
rank order) costs only the memory: the restore reads what it misses from the peers, as before.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache, partial

import numpy as np

from ..erasure.peer_read import READ_BYTES, PeerReader
from ..erasure.reshard import plan_copies
from ..state import checksum
from ..state.layout import Fragment, MeshSpec, TensorLayout

STAGE_AXIS = "pp"  # ranks of different coordinates on it hold different tensors, not parts of the same ones

Span = tuple[int, int]  # [start, stop) of an old slot's bytes


def coordinates(topology: Mapping[str, int], rank: int) -> dict[str, int]:
    """`rank`'s coordinate on every axis of `topology` (axes outer to inner, ranks row-major)."""
    coords, rest = {}, rank
    for axis in reversed(list(topology)):
        coords[axis] = rest % topology[axis]
        rest //= topology[axis]
    return coords


def new_fragment(
    layout: TensorLayout, *, old: Mapping[str, int], new: Mapping[str, int], rank: int, holders: Sequence[int]
) -> Fragment | None:
    """What `rank` of a world laid out as `new` holds of a tensor that old ranks `holders` held as
    `layout` in the world laid out as `old`: the same placements on the same axes, resized; None
    when `rank` holds none of it (another pipeline stage) or the change is not a resize of them."""
    mine = coordinates(new, rank)
    stage = mine.get(STAGE_AXIS, 0)
    if old.get(STAGE_AXIS, 1) != new.get(STAGE_AXIS, 1):
        return None  # stages were regrouped: which tensors a rank holds changed too
    if layout.mesh is None:
        held = any(coordinates(old, h).get(STAGE_AXIS, 0) == stage for h in holders)
        return layout.fragment(rank) if held else None
    axes = layout.mesh.axes
    if any(a not in old or a not in new for a in axes):
        return None
    if STAGE_AXIS not in axes and coordinates(old, layout.mesh.ranks[0]).get(STAGE_AXIS, 0) != stage:
        return None
    return replace(layout, mesh=_submesh(axes, tuple(new.items()), rank)).fragment(rank)


@lru_cache(maxsize=256)
def _submesh(axes: tuple[str, ...], topology: tuple[tuple[str, int], ...], rank: int) -> MeshSpec:
    """The mesh over `axes` through `rank`: every rank that agrees with it off those axes, row-major."""
    sizes = dict(topology)
    mine = coordinates(sizes, rank)
    world = math.prod(sizes.values())
    ranks = tuple(
        r for r in range(world) if all(c == mine[a] for a, c in coordinates(sizes, r).items() if a not in axes)
    )
    return MeshSpec(axes, tuple(sizes[a] for a in axes), ranks)


def restore_reads(
    reader: PeerReader, *, topology: Mapping[str, int], ranks: Sequence[int]
) -> dict[int, dict[int, list[Span]]]:
    """New rank -> old rank -> the merged byte spans of the old rank's slot that the new rank (of a
    world laid out as `topology`) will read in its restore."""
    old = {a: int(n) for a, n in reader.chosen.plan.topology.items() if a != "world_size"}
    new = {a: int(n) for a, n in topology.items() if a != "world_size"}
    layouts = {r: reader.layout(r) for r in sorted(reader.chosen.sources)}
    tensors: dict[str, tuple[TensorLayout, list[int]]] = {}
    for r, layout in layouts.items():
        for entry in layout.entries:
            tensor = tensors.setdefault(entry.name, (Fragment.from_json(entry.fragment).layout, []))
            tensor[1].append(r)
    reads: dict[int, dict[int, list[Span]]] = {}
    for rank in ranks:
        fragments = {}
        for name, (layout, holders) in tensors.items():
            fragment = new_fragment(layout, old=old, new=new, rank=rank, holders=holders)
            if fragment is not None:
                fragments[name] = fragment
        copies, _ = plan_copies(layouts, fragments)
        spans: dict[int, list[Span]] = {}
        for copy in copies:
            start, stop = copy.span()  # widened to whole pieces: the restore checks their checksums
            lo, hi, _ = checksum.covering(layouts[copy.rank], start, stop - start)
            spans.setdefault(copy.rank, []).append((min(lo, start), max(hi, stop)))
        reads[rank] = {r: merge(s) for r, s in spans.items()}
    return reads


def prefetch_spans(
    reads: Mapping[int, Mapping[int, Sequence[Span]]], *, held: Callable[[int], bool]
) -> dict[int, list[Span]]:
    """Old rank -> the merged spans of its slot that any new rank of `reads` (`restore_reads`) will
    read, for the old ranks not `held` whole on this node: what the prefetch fetches."""
    spans: dict[int, list[Span]] = {}
    for by_old in reads.values():
        for rank, runs in by_old.items():
            if not held(rank):
                spans.setdefault(rank, []).extend(runs)
    return {r: merge(s) for r, s in spans.items()}


def merge(spans: Sequence[Span]) -> list[Span]:
    out: list[Span] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        elif b > a:
            out.append((a, b))
    return out


def subtract(spans: Sequence[Span], have: Sequence[Span]) -> list[Span]:
    """The parts of `spans` (merged) that `have` (merged) does not cover."""
    out: list[Span] = []
    for a, b in spans:
        for c, d in have:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


@dataclass(frozen=True)
class Prefetched:
    """Byte spans of old rank `rank`'s slot of `step`, stored back to back in one buffer."""

    rank: int
    step: int
    spans: tuple[tuple[int, int, int], ...]  # (start, stop, position in the buffer)

    @property
    def nbytes(self) -> int:
        return sum(b - a for a, b, _ in self.spans)

    def find(self, offset: int, nbytes: int) -> int | None:
        """Where bytes [offset, offset+nbytes) of the slot lie in the buffer, None if not all here."""
        i = bisect.bisect_right(self._starts, offset) - 1  # the last span starting at or before offset
        if i < 0:
            return None
        a, b, at = self._by_start[i]
        return at + offset - a if offset + nbytes <= b else None

    @cached_property
    def _by_start(self) -> list[tuple[int, int, int]]:
        return sorted(self.spans)

    @cached_property
    def _starts(self) -> list[int]:
        return [a for a, _, _ in self._by_start]

    def to_json(self) -> list[list[int]]:
        return [list(s) for s in self.spans]

    @staticmethod
    def from_json(rank: int, step: int, data: Sequence[Sequence[int]]) -> Prefetched:
        return Prefetched(rank, step, tuple((int(a), int(b), int(at)) for a, b, at in data))


def prefetch_rank(
    reader: PeerReader, *, rank: int, spans: Sequence[Span], allocate: Callable[[int], np.ndarray]
) -> tuple[Prefetched, np.ndarray, float]:
    """Read `spans` of old `rank`'s slot (from peers, or decoded) into memory from `allocate(nbytes)`,
    in parallel; what was prefetched, the buffer, and the seconds it took."""
    start = time.perf_counter()
    placed, at = [], 0
    for a, b in spans:
        placed.append((a, b, at))
        at += b - a
    out = allocate(at)
    reads = [
        partial(reader.read, rank, a + o, min(READ_BYTES, b - a - o), out=out[p + o : p + min(b - a, o + READ_BYTES)])
        for a, b, p in placed
        for o in range(0, b - a, READ_BYTES)
    ]
    reader.run(reads)
    return Prefetched(rank, reader.chosen.step, tuple(placed)), out, time.perf_counter() - start
