"""Rebuild a lost node's ranks in a surviving keeper while the job restarts, off the critical path.

When a node dies, the survivors' workers fail within a second or two, and their replacements need
many seconds (re-rendezvous, start-up, model build) before they ask for state. The keepers are idle
then: each asks its peers what they hold; for every lost node one survivor (the nearest before it in
the plan's node order, else after: the one whose new ranks most likely need its rows when data
parallelism shrinks) decodes the lost ranks' slots into its own shared memory. To a recovery, a
rebuilt slot is one more held copy (`peer_plan` prefers held copies over decoding), read in place by
its node's new ranks and over TCP by the others; nothing waits for it, and a recovery that finds no
rebuilt copy decodes as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..erasure.coding import ErasureSetup
from ..erasure.peer_plan import Inventory, MemoryPlan, choose
from ..erasure.peer_read import READ_BYTES, LocalSlot, PeerReader
from ..erasure.wire import PeerClient, PeerError, PeerRefused
from ..state.slot_layout import SlotLayout

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # a peer keeper that cannot be reached within this is taken as lost


@dataclass(frozen=True)
class Rebuilt:
    """A lost rank's slot of `step`, decoded into `data`, with what a recovery needs besides its bytes."""

    rank: int
    step: int
    token: str
    layout: SlotLayout
    tree: Any
    sums: list[int] | None  # its checksums, as its worker computed them (every piece was checked on decoding)
    seconds: float


def probe(
    plan: ErasureSetup,
    *,
    node: str,
    own: Mapping[str, Any],
    timeout: float = PROBE_TIMEOUT_S,
    skip: Collection[str] = (),
) -> dict[str, Inventory] | None:
    """The inventories of the plan's nodes that answer (this node's is `own`); the others, and those in
    `skip` (known silent), are lost. None when a peer answers but refuses (it serves another run, or no
    longer holds this plan): rebuild nothing."""
    found = {node: Inventory(own)}
    for peer, address in plan.peers.items():
        if peer == node or peer in skip:
            continue
        try:
            client = PeerClient(address, secret=plan.secret, timeout=timeout)
        except PeerRefused as e:
            log.info("the keeper of %s is alive but refused this plan (%s): nothing is rebuilt ahead", peer, e)
            return None
        except PeerError:
            continue  # nothing listens there: the node is gone
        try:
            reply, _ = client.request("inventory")
            found[peer] = Inventory(reply["inventory"])
        except PeerError as e:
            log.info("the keeper of %s is alive but did not report its memory (%s): nothing is rebuilt ahead", peer, e)
            return None
        finally:
            client.close()
    return found


def rebuilder(nodes: Sequence[str], lost: str, alive: Sequence[str]) -> str | None:
    """The survivor that rebuilds `lost`: the nearest alive node before it in `nodes`, else after it."""
    i = nodes.index(lost)
    before = [n for n in reversed(nodes[:i]) if n in alive]
    after = [n for n in nodes[i + 1 :] if n in alive]
    return (before or after or [None])[0]


def assigned(chosen: MemoryPlan, *, node: str, alive: Sequence[str]) -> list[int]:
    """The lost ranks of `chosen` (decoded, not held anywhere) that `node` is to rebuild."""
    nodes = list(chosen.plan.nodes)
    return sorted(
        r for r, s in chosen.sources.items() if s.kind == "decoded" and rebuilder(nodes, s.node, alive) == node
    )


def plan_rebuild(inventories: Mapping[str, Inventory], *, node: str) -> tuple[MemoryPlan | None, list[int]]:
    """The newest step the survivors can rebuild, and the lost ranks this node rebuilds of it."""
    chosen, _ = choose(list(inventories.values()), current="")
    if chosen is None or not chosen.lost:
        return None, []
    return chosen, assigned(chosen, node=node, alive=list(inventories))


def rebuild_rank(
    chosen: MemoryPlan,
    inventories: Mapping[str, Inventory],
    *,
    rank: int,
    node: str,
    local: LocalSlot,
    allocate: Callable[[int], np.ndarray],
) -> tuple[Rebuilt, np.ndarray]:
    """Decode lost `rank`'s whole slot into memory from `allocate(nbytes)` (reading this node's own
    slots through `local`, the rest from peers, in parallel); its description and the bytes."""
    start = time.perf_counter()
    reader = PeerReader(chosen, inventories, secret=chosen.plan.secret, node=node, local=local)
    try:
        layout, tree, sums = reader.layout(rank), reader.tree(rank), reader.sums(rank)
        out = allocate(layout.nbytes)
        reads = [
            partial(reader.read, rank, a, min(READ_BYTES, layout.nbytes - a), out=out[a : a + READ_BYTES])
            for a in range(0, layout.nbytes, READ_BYTES)
        ]
        reader.run(reads)
    finally:
        reader.close()
    seconds = time.perf_counter() - start
    return Rebuilt(rank, chosen.step, chosen.plan.token, layout, tree, sums, seconds), out
