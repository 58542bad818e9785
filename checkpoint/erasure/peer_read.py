"""Restore a rank of the new topology from the surviving keepers' memory, resharding as from disk.

Each new rank needs, per tensor, the boxes its fragment covers. The old ranks' slot layouts say
which old entry holds which boxes; an entry is read from whichever keeper holds its slot, or, for a
lost node, rebuilt from the same byte range of k surviving buffers of its stripe (only the ranges
asked for are decoded). Boxes are then copied exactly as the disk loader copies chunks, so memory,
peers and disk reshard the same way. Old ranks held by this node's own keeper are copied straight out
of its shared memory; the rest travel over one connection per peer and reading thread, several
reads in flight at once, so the survivors' memories are read in parallel.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import crc32c
import numpy as np

from ..bulk_copy import copy_into
from ..errors import CheckpointError
from ..scratch import scratch
from ..state import checksum
from ..state.flatten import merge_trees
from ..state.slot_layout import SlotLayout
from . import code as erasure
from .coding import NodeCoding, segment_read
from .peer_plan import Inventory, MemoryPlan
from .plan import GroupPlan
from .wire import PeerClient

LocalSlot = Callable[[int, int], "np.ndarray | None"]  # (old rank, step) -> its slot in this node's keeper
LocalSpan = Callable[
    [int, int, int, int], "np.ndarray | None"
]  # (old rank, step, offset, nbytes) -> bytes prefetched here
Described = Callable[
    [int, int], "tuple[SlotLayout, Any, list[int] | None] | None"
]  # (old rank, step) -> its layout, JSON states, checksums
READ_BYTES = 16 * 2**20  # one read request: small enough to spread a tensor over the reading threads
READ_THREADS = max(2, min(4, os.cpu_count() or 1))  # reads in flight; more threads than cores only contend
_SCRATCH = 8  # scratch slots from here on: survivors received for a decode, one per stripe position


class PeerReader:
    """Reads old ranks' slot bytes of one `MemoryPlan` from the surviving keepers.

    `node` and `local` name this node and read its own keeper's slots from shared memory; `prefetched`
    reads the byte ranges of other old ranks its keeper fetched ahead (prefetch.py), and `described`
    gives the layouts and JSON states of what it holds or prefetched; `run` executes reads on `threads`
    threads, each with its own connection to every peer.
    """

    def __init__(
        self,
        chosen: MemoryPlan,
        inventories: Mapping[str, Inventory],
        *,
        secret: str,
        node: str | None = None,
        local: LocalSlot | None = None,
        prefetched: LocalSpan | None = None,
        described: Described | None = None,
        threads: int = READ_THREADS,
    ) -> None:
        self.chosen, self.inventories, self.secret = chosen, inventories, secret
        self.node, self.local, self.prefetched, self.described, self.threads = (
            node,
            local,
            prefetched,
            described,
            threads,
        )
        self._tls = threading.local()
        self._connections: list[dict[str, PeerClient]] = []
        self._lock = threading.RLock()  # a meta fetched under it opens this thread's connection
        self._metas: dict[str, dict[str, Any]] = {}
        self._described: dict[tuple[str, int], Mapping[str, Any]] = {}  # (holder, rank) -> its slot's layout and trees
        self._descriptions: dict[
            int, tuple[SlotLayout, Any, list[int] | None]
        ] = {}  # old rank -> layout, JSON state, checksums
        self._checked: set[tuple[int, int]] = set()  # (old rank, piece) verified in this node's memory, which stays put
        self.fetched = self.decoded = self.local_bytes = 0  # bytes of old slots read, rebuilt, and copied locally
        self.fetch_s = self.decode_s = 0.0  # summed over the reading threads

    def close(self) -> None:
        for clients in self._connections:
            for client in clients.values():
                client.close()

    def run(self, reads: list[Callable[[], Any]], *, here: list[Callable[[], Any]] | None = None) -> None:
        """Execute `reads` (each one request's worth) in parallel, and meanwhile, on the calling thread,
        the copies out of this node's memory (`here`): one copy stream per process is what a core can
        do, and the node's other ranks copy at the same time. The first error is raised."""
        local = list(here or [])
        if self.threads <= 1 or len(reads) <= 1:
            for read in [*reads, *local]:
                read()
            return
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="resurgo-peer-read") as pool:
            futures = [pool.submit(read) for read in reads]
            for read in local:
                read()
            for future in futures:
                future.result()

    # ---- what the old ranks were --------------------------------------------------------------

    def layout(self, rank: int) -> SlotLayout:
        return self._description(rank)[0]

    def tree(self, rank: int) -> Any:
        return self._description(rank)[1]

    def sums(self, rank: int) -> list[int] | None:
        """Old rank `rank`'s slot checksums (checksum.py), None when its keeper had none."""
        return self._description(rank)[2]

    def describe(self, ranks: Sequence[int]) -> None:
        """Ask for the slot layouts and JSON states of the held old `ranks` that compact inventories
        leave out: one request per holder, for the chosen step only."""
        by_node: dict[str, list[int]] = {}
        for rank in ranks:
            source = self.chosen.sources[rank]
            if (
                source.kind == "held"
                and self._handed(rank) is None
                and "layout" not in self._entry(self.inventories[source.node], source.via)
            ):
                by_node.setdefault(source.node, []).append(source.via)
        with self._lock:
            for node, vias in by_node.items():
                vias = sorted({v for v in vias if (node, v) not in self._described})
                if not vias:
                    continue
                reply, _ = self._client(node).request("inventory", ranks=vias, step=self.chosen.step)
                found = Inventory(reply["inventory"])
                for via in vias:
                    entry = found.entry(via, self.chosen.step)
                    if entry is None or str(self.chosen.step) not in entry.get("trees", {}):
                        raise CheckpointError(
                            f"the keeper on {node} no longer holds step {self.chosen.step} of rank {via}"
                        )
                    self._described[(node, via)] = entry

    def _description(self, rank: int) -> tuple[SlotLayout, Any, list[int] | None]:
        """Old rank `rank`'s slot layout and JSON state of the chosen step, looked up once: as this
        node's keeper handed them over with the memory it holds or prefetched, else from the holder's
        inventory (asked for when compact), else, for a lost rank, from its node's meta."""
        with self._lock:
            if rank in self._descriptions:
                return self._descriptions[rank]
        found, source, step = self._handed(rank), self.chosen.sources[rank], str(self.chosen.step)
        if found is None and source.kind == "held":
            entry = self._entry(self.inventories[source.node], source.via)
            if "layout" not in entry:
                self.describe([rank])
                entry = self._described[(source.node, source.via)]
            found = SlotLayout.from_json(entry["layout"]), entry["trees"][step], entry.get("sums", {}).get(step)
        elif found is None:
            meta = self._meta(source.node)
            found = (
                SlotLayout.from_json(meta["layouts"][str(rank)]),
                meta["trees"][str(rank)],
                meta.get("sums", {}).get(str(rank)),
            )
        with self._lock:
            return self._descriptions.setdefault(rank, found)

    def _entry(self, inventory: Inventory, via: int) -> Mapping[str, Any]:
        """What `inventory` reports of old rank `via`'s slot of the chosen step (the plan found it there)."""
        entry = inventory.entry(via, self.chosen.step)
        assert entry is not None, "a held source is in its holder's inventory"
        return entry

    def _handed(self, rank: int) -> tuple[SlotLayout, Any, list[int] | None] | None:
        """Old rank `rank`'s layout and JSON state as this node's keeper handed them over with the
        memory it holds or prefetched (no request, no parsing), else None."""
        if self.described is None:
            return None
        source, step = self.chosen.sources[rank], self.chosen.step
        found = self.described(rank, step)
        if found is None and source.kind == "held" and source.via != rank and source.node == self.node:
            found = self.described(source.via, step)
        return found

    def _meta(self, node: str) -> dict[str, Any]:
        """A lost node's meta (JSON state and layouts of its ranks) from any survivor holding it."""
        with self._lock:
            if node in self._metas:
                return self._metas[node]
            token, step = self.chosen.plan.token, self.chosen.step
            holder = next(n for n, inv in self.inventories.items() if node in inv.metas(token, step))
            reply, _ = self._client(holder).request("meta_of", token=token, step=step, node=node)
            if reply.get("meta") is None:
                raise CheckpointError(f"the keeper on {holder} no longer holds the meta of lost node {node}")
            self._metas[node] = reply["meta"]
            return reply["meta"]

    # ---- bytes --------------------------------------------------------------------------------

    def read(self, rank: int, offset: int, nbytes: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Bytes [offset, offset+nbytes) of old rank `rank`'s slot (into `out`, uint8, when given),
        checked: a fetched or decoded range is widened to whole pieces, whose checksums it must match."""
        if (here := self.here(rank, offset, nbytes)) is not None:
            return _deliver(here, out)  # a copy: the mapping goes at close
        sums = self.sums(rank)
        start, stop, indices = (
            checksum.covering(self.layout(rank), offset, nbytes) if sums else (offset, offset + nbytes, [])
        )
        start, stop = min(start, offset), max(stop, offset + nbytes)  # padding between tensors is in no piece
        if (start, stop) == (offset, offset + nbytes):
            data = self._read_far(rank, offset, nbytes, out=out)
            self._verify(rank, start, data, indices)
            return data
        whole = self._read_far(rank, start, stop - start)
        self._verify(rank, start, whole, indices)
        return _deliver(whole[offset - start : offset - start + nbytes], out)

    def _verify(self, rank: int, start: int, data: np.ndarray, indices: list[int]) -> None:
        """Check `data`, bytes of old rank `rank`'s slot from `start`, against the pieces `indices`."""
        sums, every = self.sums(rank), checksum.pieces(self.layout(rank))
        for i in indices:
            a, n, name = every[i]
            if crc32c.crc32c(data[a - start : a - start + n]) != sums[i]:
                source = self.chosen.sources[rank]
                where = f"held by {source.node}" if source.kind == "held" else f"decoded for lost {source.node}"
                raise checksum.ChecksumMismatch(
                    f"old rank {rank}'s snapshot of step {self.chosen.step} ({where}), {name} bytes [{a}, {a + n}): checksum "
                    "mismatch: a keeper's memory or the network corrupted it"
                )

    def _read_far(self, rank: int, offset: int, nbytes: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Bytes of old rank `rank`'s slot that this node does not hold: fetched, or decoded."""
        source = self.chosen.sources[rank]
        if source.kind == "held":
            self._count(fetched=nbytes)
            return self._fetch(source.node, kind="slot", rank=source.via, offset=offset, nbytes=nbytes, out=out)
        self._count(fetched=nbytes, decoded=nbytes)
        return self._decode(source.node, rank, offset, np.empty(nbytes, dtype=np.uint8) if out is None else out)

    def here(self, rank: int, offset: int, nbytes: int) -> np.ndarray | None:
        """Bytes [offset, offset+nbytes) of old rank `rank`'s slot in this node's memory (prefetched ahead,
        or the slot held here: a view, counted as copied locally), else None. Checked once per piece:
        None too when this node's memory does not hold the whole pieces around them."""
        found = self._here(rank, offset, nbytes)
        if found is None:
            return None
        sums = self.sums(rank)
        if sums:
            start, stop, indices = checksum.covering(self.layout(rank), offset, nbytes)
            with self._lock:
                indices = [i for i in indices if (rank, i) not in self._checked]
            if indices:
                every = checksum.pieces(self.layout(rank))
                lo, hi = every[indices[0]][0], every[indices[-1]][0] + every[indices[-1]][1]
                if (around := self._here(rank, lo, hi - lo)) is None:
                    return None
                self._verify(rank, lo, around, indices)
                with self._lock:
                    self._checked.update((rank, i) for i in indices)
        self._count(local_bytes=nbytes)
        return found

    def holds(self, rank: int, offset: int, nbytes: int) -> bool:
        """Whether this node's memory has bytes [offset, offset+nbytes) of old rank `rank`'s slot
        (with the whole pieces around them, to check)."""
        if self.sums(rank):
            start, stop, _ = checksum.covering(self.layout(rank), offset, nbytes)
            offset, nbytes = min(start, offset), max(stop, offset + nbytes) - min(start, offset)
        return self._here(rank, offset, nbytes) is not None

    def _here(self, rank: int, offset: int, nbytes: int) -> np.ndarray | None:
        step = self.chosen.step
        if self.prefetched is not None and (ahead := self.prefetched(rank, step, offset, nbytes)) is not None:
            return ahead
        source = self.chosen.sources[rank]
        mine = (
            self.local(source.via, step) if source.kind == "held" and self.local and source.node == self.node else None
        )
        return mine[offset : offset + nbytes] if mine is not None and offset + nbytes <= mine.size else None

    def _count(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def _decode(self, node: str, rank: int, offset: int, out: np.ndarray) -> np.ndarray:
        """Bytes [offset, offset+out.size) of lost old rank `rank`'s slot, rebuilt into `out`."""
        group = self.chosen.erasure.group_of(node)
        assert group is not None, "a decoded source belongs to a group"
        coding = self._coding(node)
        start = coding.base(rank) + offset
        done = 0
        while done < out.size:
            index, a = divmod(start + done, coding.segment)
            n = min(out.size - done, coding.segment - a)
            self._decode_window(group, node, index, a, out[done : done + n])
            done += n
        return out

    def _decode_window(self, group: GroupPlan, node: str, index: int, a: int, out: np.ndarray) -> None:
        """Bytes [a, a+out.size) of segment `index` of lost `node`, rebuilt into `out` from k survivors
        of its stripe. Survivors held here are read in place; with XOR parity the parity is received
        straight into `out` and the rest XORed into it, else the remote ones land in this thread's
        scratch buffers: no byte is allocated, and none copied twice."""
        n = out.size
        plan, step, token = self.chosen.plan, self.chosen.step, self.chosen.plan.token
        stripe_index, stripe = next((i, s) for i, s in enumerate(group.stripes) if (node, index) in s.data)
        lengths = tuple(
            max(0, min(self._coding(member).length(t) - a, n)) if member != node else n for member, t in stripe.data
        )
        shape = erasure.Stripe(k=plan.k, m=plan.m, lengths=lengths)
        sources: dict[int, Callable[..., np.ndarray]] = {}  # survivor position -> its reader (out=...)
        for position, (member, t) in enumerate(stripe.data):
            if member != node and member in self.inventories and len(sources) < plan.k and self._serves(member):
                sources[position] = partial(self._segment, member, t, a, lengths[position])
        for p, holder in enumerate(stripe.parity):
            if (
                len(sources) < plan.k
                and holder in self.inventories
                and (stripe_index, p) in self.inventories[holder].parity(token, step)
            ):
                sources[plan.k + p] = partial(
                    self._fetch, holder, kind="parity", token=token, stripe=stripe_index, parity=p, offset=a, nbytes=n
                )
        position = next(i for i, (member, _) in enumerate(stripe.data) if member == node)
        if len(sources) == plan.k and erasure.is_xor(plan.k, plan.m, have=tuple(sorted(sources)), want=position):
            parity = next(i for i in sources if i >= plan.k)  # a data position is rebuilt from >= 1 parity
            sources.pop(parity)(out=out)
            pieces = [source(out=scratch(lengths[i], slot=_SCRATCH + i)) for i, source in sources.items()]
            start = time.perf_counter()
            for piece in pieces:
                np.bitwise_xor(out[: piece.size], piece, out=out[: piece.size])
        else:
            survivors = {i: source(out=scratch(shape.length(i), slot=_SCRATCH + i)) for i, source in sources.items()}
            start = time.perf_counter()
            erasure.decode(
                survivors, shape, want=[position], out={position: out}, threads=1
            )  # the reads are the threads
        self._count(decode_s=time.perf_counter() - start)

    def _segment(
        self, member: str, index: int, offset: int, nbytes: int, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Part of a survivor's data segment: from this node's own memory when it is this node (a view
        where it lies in one slot), else received (into `out`, when given)."""
        if self.local and member == self.node:
            coded = self.chosen.erasure.coded_on(member)
            parts = [self.local(r, self.chosen.step) for r in coded]
            if all(p is not None for p in parts):  # cut as its keeper cuts it when serving a peer
                coding = NodeCoding(self.chosen.plan.k, tuple((r, int(p.size)) for r, p in zip(coded, parts)))
                return segment_read(coding, parts, index, offset, nbytes)
        token = self.chosen.plan.token
        return self._fetch(member, kind="segment", token=token, index=index, offset=offset, nbytes=nbytes, out=out)

    def _serves(self, member: str) -> bool:
        coded = self.chosen.erasure.coded_on(member)
        return all(
            self.chosen.sources[r].kind == "held"
            and self.chosen.sources[r].node == member
            and self.chosen.sources[r].via == r
            for r in coded
        )

    def _coding(self, node: str) -> NodeCoding:
        coded = [(int(r), int(n)) for r, n in self._meta(node)["coded"]]
        return NodeCoding(self.chosen.plan.k, tuple(coded))

    def _fetch(self, node: str, *, out: np.ndarray | None = None, **fields: Any) -> np.ndarray:
        start = time.perf_counter()
        into = memoryview(out).cast("B") if out is not None else None
        _, data = self._client(node).request("fetch", step=self.chosen.step, into=into, **fields)
        self._count(fetch_s=time.perf_counter() - start)
        if out is not None and data.obj is not into.obj:
            out[:] = np.frombuffer(data, dtype=np.uint8)  # an unexpected size: the keeper's error path
        return out if out is not None else np.frombuffer(data, dtype=np.uint8)

    def _client(self, node: str) -> PeerClient:
        """This thread's connection to `node`: a connection carries one request at a time."""
        clients = getattr(self._tls, "clients", None)
        if clients is None:
            clients = self._tls.clients = {}
            with self._lock:
                self._connections.append(clients)
        if node not in clients:
            clients[node] = PeerClient(self.inventories[node].address, secret=self.secret)
        return clients[node]


def _deliver(data: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """`data` copied into `out`, or into a new array when there is none."""
    if out is None:
        return data.copy()
    copy_into(out, data)
    return out


def merged_trees(
    reader: PeerReader, *, rank: int, same_topology: bool, ranks: Sequence[int] | None = None
) -> dict[str, Any]:
    """This rank's old JSON state on the same topology, else the union over the old ranks (rank 0
    first): over old rank 0 and `ranks` when given, the ranks this rank reads tensors of, which
    hold the JSON of those tensors (rank 0's holds the rest of the run's)."""
    if same_topology:
        reader.describe([rank])
        return reader.tree(rank)
    every = sorted(reader.chosen.sources)
    olds = every if ranks is None else sorted({every[0], *(r for r in ranks if r in reader.chosen.sources)})
    reader.describe(olds)
    return merge_trees([reader.tree(r) for r in olds])
