"""Reshard old ranks' slots into a new rank's tensors: which old entry fills which region of each
target, planned with the store's geometry (`state.regions`), then read through a `PeerReader` (from
this node's keeper, from peers, or decoded) in parallel, each contiguous run straight into place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..bulk_copy import copy_into
from ..errors import CheckpointError
from ..state.dtypes import storage_dtype
from ..state.layout import Fragment, pieces
from ..state.regions import Piece, Region, covering_run, overlaps, run_of
from ..state.slot_layout import Entry, SlotLayout
from .peer_read import READ_BYTES, PeerReader


@dataclass(frozen=True)
class Copy:
    """Old rank `rank`'s entry fills regions of target `name`: (intersection key, destination slices in
    the new local data, source slices in the old local data) each."""

    name: str
    rank: int
    entry: Entry
    work: tuple[tuple[tuple, tuple, tuple], ...]

    def span(self) -> tuple[int, int]:
        """[start, stop) of the old slot's bytes this copy reads at most: the run covering its regions."""
        size = storage_dtype(self.entry.dtype).itemsize
        first, last = covering_run(self.entry.shape, [src for _, _, src in self.work])
        return self.entry.offset + first * size, self.entry.offset + last * size


def plan_copies(layouts: Mapping[int, SlotLayout], fragments: Mapping[str, Fragment]) -> tuple[list[Copy], list[str]]:
    """Which old rank's entry fills which regions of each target fragment (the lowest old rank of
    those holding an element), and a line per target the old ranks cannot cover in full."""
    by_name: dict[str, list[tuple[int, Entry]]] = {}
    for rank in sorted(layouts):
        for entry in layouts[rank].entries:
            by_name.setdefault(entry.name, []).append((rank, entry))
    copies, problems = [], []
    for name, fragment in fragments.items():
        wanted, covered = list(fragment.pieces()), set[tuple]()
        for rank, entry in by_name.get(name, []):
            work = _overlaps(entry.fragment["segments"], wanted, covered)
            if work:
                covered.update(key for key, _, _ in work)
                copies.append(Copy(name, rank, entry, tuple(work)))
        need = sum(box.numel for box in fragment.boxes())
        have = sum(_numel(key) for key in covered)
        if have != need:
            problems.append(f"{name}: the old ranks' memory covers {have} of the {need} elements this rank needs")
    return copies, problems


def fill_targets(
    reader: PeerReader, targets: Mapping[str, tuple[Fragment, np.ndarray]], *, ranks: Sequence[int] | None = None
) -> None:
    """Copy into every target (its fragment, a local numpy buffer) the boxes the old ranks held.

    `ranks`: the old ranks expected to cover the targets (as this node's keeper planned them when
    prefetching), whose layouts alone are then read; all old ranks when they do not. The whole plan is
    checked first (every element of every target covered), then read in parallel.
    """
    fragments = {name: fragment for name, (fragment, _) in targets.items()}
    every = sorted(reader.chosen.sources)
    some = sorted(set(ranks) & set(every)) if ranks is not None else every
    copies, problems = _plan(reader, some, fragments)
    if problems and some != every:
        copies, problems = _plan(reader, every, fragments)
    if problems:
        raise CheckpointError("memory cannot rebuild this rank's state:\n  " + "\n  ".join(problems[:10]))
    reads, here = [], []
    for copy in copies:
        out, entry = targets[copy.name][1], copy.entry
        spans = [run_of(entry.shape, src) for _, _, src in copy.work]
        if all(
            span is not None and _region(out, dst).flags.c_contiguous for span, (_, dst, _) in zip(spans, copy.work)
        ):
            # each region is one run of bytes on both sides: copy or read it straight into place
            itemsize = storage_dtype(entry.dtype).itemsize
            for (_, dst, _), (first, _last) in zip(copy.work, spans):
                view, base = _region(out, dst).reshape(-1).view(np.uint8), entry.offset + first * itemsize
                if (source := reader.here(copy.rank, base, view.size)) is not None:
                    here.append(partial(copy_into, view, source))
                    continue
                for a in range(0, view.size, READ_BYTES):  # pieces spread a tensor over the reading threads
                    piece = view[a : a + READ_BYTES]
                    reads.append(partial(reader.read, copy.rank, base + a, piece.size, out=piece))
        else:
            start, stop = copy.span()
            (here if reader.holds(copy.rank, start, stop - start) else reads).append(
                partial(_copy_regions, reader, copy, out)
            )
    reader.run(reads, here=here)


def _plan(reader: PeerReader, ranks: Sequence[int], fragments: Mapping[str, Fragment]) -> tuple[list[Copy], list[str]]:
    reader.describe(ranks)
    return plan_copies({rank: reader.layout(rank) for rank in ranks}, fragments)


def _copy_regions(reader: PeerReader, copy: Copy, out: np.ndarray) -> None:
    data = _read_span(reader, copy)
    for _, dst, src in copy.work:
        copy_into(_region(out, dst), data[src])


def _region(out: np.ndarray, where: tuple[slice, ...]) -> np.ndarray:
    """A view of `out` (indexing a 0-d array with () would give a scalar copy)."""
    return out[where] if out.ndim else out


def _read_span(reader: PeerReader, copy: Copy) -> np.ndarray:
    """The old entry as an array of its local shape, with (at least) the copy's regions read: only
    the contiguous byte span that covers them travels (a row range, when dim 0 is what was split)."""
    entry = copy.entry
    dtype = storage_dtype(entry.dtype)
    start, stop = copy.span()
    flat = np.empty(max(1, int(np.prod(entry.shape))), dtype=dtype)  # only the span is ever read
    first = (start - entry.offset) // dtype.itemsize
    reader.read(
        copy.rank, start, stop - start, out=flat[first : first + (stop - start) // dtype.itemsize].view(np.uint8)
    )
    return flat.reshape(entry.shape)


def _overlaps(old: list, wanted: list[Piece], covered: set[tuple]) -> list[tuple[tuple, Region, Region]]:
    """(intersection key, destination in the new local data, source in the old local data) for each of
    `wanted` (the new fragment's pieces) that the old fragment (its `segments`, as stored) holds part
    of and no earlier old rank covered."""
    return [
        ((inter.offsets, inter.sizes), dst, src)
        for inter, dst, src in overlaps(wanted, list(pieces(old)))
        if (inter.offsets, inter.sizes) not in covered
    ]


def _numel(key: tuple) -> int:
    n = 1
    for size in key[1]:
        n *= size
    return n
