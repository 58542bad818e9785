"""Cross-node protection for one worker: the erasure plan every keeper gets, and resume from peers.

`agree_plan` (collective) learns every rank's node and keeper address, forms the plan (nodes in the
order of their first rank, data-parallel replicas as redundancy that needs no parity) and hands it
to the keepers through each node's local rank 0. `resume_from_peers` (collective) gathers what the
surviving keepers hold, picks the newest step of the previous incarnation that their memory can
rebuild (`peer_plan.choose`), and fills this rank's state from it, resharded to the new topology.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..comm import Comm
from ..erasure.coding import ErasureSetup
from ..erasure.peer_plan import Inventory, absent, choose
from ..erasure.peer_read import PeerReader, merged_trees
from ..erasure.reshard import fill_targets
from ..erasure.share_site import decide_site
from ..erasure.wire import PeerError, unreachable
from ..errors import CheckpointError, PeerUnreachable, WorldIncomplete
from ..keeper import messages as m
from ..keeper.client import HeldSlots
from ..keeper.protocol import Client, KeeperGone, ask, node_id, run_id, socket_path
from ..snapshot.capture import StateCapture
from ..state.dtypes import as_numpy, dtype_name, storage_dtype, to_torch
from .sources import KeeperRequest, Resumed

log = logging.getLogger(__name__)


def replica_sets(topology: Mapping[str, int], world_size: int) -> tuple[tuple[int, ...], ...]:
    """Ranks holding identical state: those that differ only in their dp_replicate coordinate.

    `topology` lists the mesh axes outer to inner (`ParallelDims.as_dict()`), ranks row-major over them.
    """
    axes, sizes = list(topology), [int(n) for n in topology.values()]
    if int(topology.get("dp_replicate", 1)) <= 1:
        return ()
    sets: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world_size):
        coords, rest = [], rank
        for size in reversed(sizes):
            coords.append(rest % size)
            rest //= size
        coords.reverse()
        sets.setdefault(tuple(c for a, c in zip(axes, coords) if a != "dp_replicate"), []).append(rank)
    return tuple(tuple(s) for s in sets.values())


def code_shape(nodes: int, *, data: str, parity: int, degrade: bool) -> tuple[int, int]:
    """(k, m) for `nodes` nodes. After nodes were lost (`degrade`), a code that no longer fits shrinks to
    the strongest one that does (m <= nodes - 1) rather than stopping a job that could go on."""
    k = nodes - parity if data == "auto" else int(data)
    if not degrade or k + parity <= nodes and k >= 1:
        return k, parity
    m = min(parity, nodes - 1)
    log.warning(
        "%d nodes cannot hold k+m = %d+%d: coding with k=%d, m=%d until nodes come back", nodes, k, parity, nodes - m, m
    )
    return nodes - m, m


def agree_plan(
    *,
    comm: Comm,
    keeper: KeeperRequest,
    local_rank: int,
    token: str,
    data: str,
    parity: int,
    topology: Mapping[str, int],
    degrade: bool = False,
    every: int = 1,
    max_mb_s: float = 0.0,
    encode: str = "auto",
    device: torch.device | None = None,
) -> tuple[ErasureSetup | None, str]:
    """The erasure plan of this incarnation (None on one node), installed in every node's keeper, and
    the incarnation's secret, which keepers ask of whoever reads their memory. Where the shares are
    scaled (`encode`, encode_site.py) is decided on rank 0, on its device, for every node."""
    hello = keeper(m.Hello())
    mine = {"node": hello and hello.node, "address": hello and hello.peer_address, "local_rank": local_rank}
    everyone = comm.all_gather(mine)
    if any(e["node"] is None for e in everyone):
        return None, ""  # some rank has no keeper: nothing to code with
    nodes: list[str] = []
    for e in everyone:
        if e["node"] not in nodes:
            nodes.append(e["node"])
    secret, created = comm.all_gather((secrets.token_hex(16), time.time()))[0]
    if len(nodes) < 2:
        if local_rank == 0:
            keeper(m.Protect(None, secret))  # one node: nothing to code; earlier plans stay readable
        return None, secret
    ranks = {n: tuple(r for r, e in enumerate(everyone) if e["node"] == n) for n in nodes}
    peers = {e["node"]: e["address"] for e in everyone if e["local_rank"] == 0}
    k, parity = code_shape(len(nodes), data=data, parity=parity, degrade=degrade)
    if k < 1:
        raise ValueError(f"fault.erasure.parity={parity} leaves no data node among {len(nodes)} nodes; lower it")
    site, why = comm.all_gather(decide_site(encode, m=parity, device=device) if comm.rank == 0 else None)[0]
    plan = ErasureSetup(
        token=token,
        created=created,
        secret=secret,
        nodes=tuple(nodes),
        ranks=ranks,
        replicas=replica_sets(topology, comm.world_size),
        k=k,
        m=parity,
        peers=peers,
        world_size=comm.world_size,
        topology=dict(topology),
        every=every,
        max_mb_s=max_mb_s,
        site=site,
    )
    plan.erasure()  # refuses a node count the code cannot use, on every rank alike
    reply = keeper(m.Protect(plan.to_json())) if local_rank == 0 else None
    reach = keeper(m.Reach()) if local_rank == 0 else None
    _check_reach(comm, reach.to_json() if reach else None)
    if comm.rank == 0:
        log.info("erasure plan, %d nodes:\n%s", len(nodes), reply.describe if reply else "")
    if comm.rank == 0 and parity >= 2:
        where = "by each worker on its device, before the copy to host" if site == "device" else "by the parity holders"
        log.info("shares of parity rows 1..m-1 are scaled %s (%s)", where, why)
    return plan, secret


def _check_reach(comm: Comm, mine: Mapping[str, Any] | None) -> None:
    """Every node's keeper reaches every other (collective): one clear error at start rather than a
    warning per step from the parity exchange."""
    problems = [
        f"{r['node']} -> {peer} at {why}"
        for r in comm.all_gather(mine)
        if r
        for peer, why in sorted(r["unreachable"].items())
    ]
    if problems:
        raise PeerUnreachable(
            "keepers cannot reach each other, so no node's memory can be protected:\n  "
            + "\n  ".join(problems)
            + "\nset RESURGO_PEER_HOST on every node to an address the other nodes can reach (launch/multinode.sh "
            "--peer-host), open that port range between the nodes, or set fault.erasure.parity=0"
        )


@dataclass(frozen=True)
class PeerResume:
    """The step loaded from peers (None: nothing loaded), what happened, and whether protected state
    existed that memory could not rebuild (then a fresh start would silently lose a run)."""

    step: int | None
    detail: str
    lost: bool = False


class PeersMemory:
    """The rung between this node's memory and the disk: the surviving keepers' memory, decoded
    where a node was lost and resharded onto the new topology. `loss` says why it could not
    rebuild a step it had protected (a refused fresh start names it)."""

    name, label = "peers", "from peer keepers' memory"

    def __init__(
        self,
        *,
        comm: Comm,
        keeper: KeeperRequest,
        local_rank: int,
        token: str,
        secret: str,
        capture: StateCapture,
        topology: Mapping[str, int],
        held: Callable[[], HeldSlots | None],
    ) -> None:
        self.comm, self.keeper, self.local_rank, self.token, self.secret = comm, keeper, local_rank, token, secret
        self.capture, self.topology, self.held = capture, topology, held
        self.loss = ""

    def restore(self) -> Resumed | None:
        held = self.held()
        try:
            found = resume_from_peers(
                comm=self.comm,
                keeper=self.keeper,
                local_rank=self.local_rank,
                token=self.token,
                secret=self.secret,
                capture=self.capture,
                topology=self.topology,
                node=node_id(),
                held=held,
            )
        finally:
            if held is not None:
                held.close_soon()
        if found.step is not None:
            return Resumed(self.name, found.step, found.detail)
        self.loss = found.detail if found.lost else ""
        return None


def _refuse_without_answering_nodes(comm: Comm, inventories: Iterable[Inventory], *, token: str, why: str) -> None:
    """Raise WorldIncomplete (collective) when some node memory needs is left out of this world
    but its keeper answers: the node is alive (it joined the rendezvous after the round closed, as
    survivors that notice a hung node a moment apart can), so a new round rebuilds the run, where a
    verdict from this world alone would refuse it."""
    answering = None
    if comm.rank == 0:
        left_out = absent(list(inventories), current=token)
        answering = sorted(n for n, address in left_out.items() if unreachable(address, timeout=1.0) is None)
    answering = comm.all_gather(answering)[0]  # rank 0's look, on every rank
    if answering:
        raise WorldIncomplete(
            f"memory cannot rebuild the run without {', '.join(answering)}, whose keepers answer but which "
            f"are not in this world ({why}): restarting so that the next rendezvous round takes them in"
        )


def resume_from_peers(
    *,
    comm: Comm,
    keeper: KeeperRequest,
    local_rank: int,
    token: str,
    secret: str,
    capture: StateCapture,
    topology: Mapping[str, int],
    node: str | None = None,
    held: HeldSlots | None = None,
) -> PeerResume:
    """Load the newest step the surviving keepers can rebuild (collective); `held` reads `node`'s own
    keeper from shared memory: its slots, and the spans it fetched ahead (`prefetch_ahead`)."""
    start = time.perf_counter()
    # Compact: every rank receives every node's report, so it carries no layouts and no JSON states;
    # each rank then asks the holders for those of the old ranks it reads (PeerReader.describe).
    reply = keeper(m.Inventory(compact=True)) if local_rank == 0 else None
    report = reply.to_json() if reply else None
    inventories = {i.node: i for i in (Inventory(r) for r in comm.all_gather(report) if r)}
    chosen, why = choose(list(inventories.values()), current=token)
    if chosen is None:
        protected = any(t != token for inv in inventories.values() for t in inv.data.get("protected", {}))
        if protected:
            _refuse_without_answering_nodes(comm, inventories.values(), token=token, why=why)
        if comm.rank == 0 and protected:
            log.warning("peer memory cannot rebuild a step: %s", why)
        return PeerResume(None, why, lost=protected)
    reader = PeerReader(
        chosen,
        inventories,
        secret=secret,
        node=node,
        local=held,
        prefetched=held.span if held else None,
        described=held.described if held else None,
    )
    reads = inventories[node].data.get("reads", {}).get(str(comm.rank)) if node in inventories else None
    ranks = reads["ranks"] if reads and reads.get("step") == chosen.step else None  # as the prefetch planned them
    planned = time.perf_counter()
    targets = capture.restore_targets()
    templated = time.perf_counter()
    # Host tensors are filled in place, as the disk loader does: a failure here ends in a restart, or
    # in a disk load that overwrites every target, never in training on a half-filled state. Device
    # tensors are filled through host buffers once every rank has read its state.
    buffers: dict[str, tuple[Any, np.ndarray]] = {}
    prefetched_on_host: list[str] = []
    try:
        for name, tensor in targets.tensors.items():
            fragment = targets.fragments[name]
            if tensor.device.type == "cpu" and tensor.is_contiguous():
                buffers[name] = (fragment, as_numpy(tensor))
            else:
                prefetched_on_host.append(name)
                buffers[name] = (
                    fragment,
                    np.empty(fragment.local_shape, dtype=storage_dtype(dtype_name(tensor.dtype))),
                )
        fill_targets(reader, buffers, ranks=ranks)  # checks that every element was filled
        same = chosen.plan.world_size == comm.world_size and dict(chosen.plan.topology) == dict(topology)
        trees = merged_trees(reader, rank=comm.rank, same_topology=same, ranks=ranks)
        error = None
    except (CheckpointError, PeerError, LookupError, ValueError) as e:
        error = f"rank {comm.rank}: {e}"
    finally:
        reader.close()
    errors = [e for e in comm.all_gather(error) if e]
    read = time.perf_counter()  # the slowest rank's read, which every rank waits for
    if errors:
        if comm.rank == 0:
            log.warning("rebuilding step %d from peer memory failed (%s)", chosen.step, errors[0])
        return PeerResume(None, f"rebuilding step {chosen.step} failed: {errors[0]}", lost=True)
    for name in prefetched_on_host:
        targets.tensors[name].copy_(to_torch(buffers[name][1], dtype_name(targets.tensors[name].dtype)))
    capture.load(targets, trees)
    mine = {
        "local": reader.local_bytes / 1e6,
        "peers": reader.fetched / 1e6,
        "decoded": reader.decoded / 1e6,
        "plan": planned - start,
        "templates": templated - planned,
        "read": read - templated,
        "load": time.perf_counter() - read,
        "fetch": reader.fetch_s,
        "decode": reader.decode_s,
    }
    ranks = comm.all_gather(mine)
    total = {key: sum(r[key] for r in ranks) for key in ("local", "peers", "decoded")}
    slow = {key: max(r[key] for r in ranks) for key in mine}
    ahead = [
        f"rank {s.via} by {s.node}'s keeper in {inventories[s.node].data['rebuilt'][str(s.via)]:.2f} s"
        for s in chosen.sources.values()
        if s.kind == "held" and str(s.via) in inventories[s.node].data.get("rebuilt", {})
    ]
    rebuilt = f"; rebuilt from peers' memory while the job restarted: {', '.join(ahead)}" if ahead else ""
    fetched = [
        f"{inv.data['prefetched']['mb']:.1f} MB by {n}'s keeper in {inv.data['prefetched']['seconds']:.2f} s"
        for n, inv in inventories.items()
        if inv.data.get("prefetched")
    ]
    rebuilt += f"; prefetched from peers while the workers started: {', '.join(fetched)}" if fetched else ""
    detail = (
        f"{chosen.describe()}{rebuilt}; {total['local']:.1f} MB copied from this node's keeper, {total['peers']:.1f} MB read "
        f"from peers, {total['decoded']:.1f} MB of it decoded; slowest rank: plan {slow['plan']:.2f} s, templates "
        f"{slow['templates']:.2f} s, read {slow['read']:.2f} s ({reader.threads} threads: fetch {slow['fetch']:.2f}, "
        f"decode {slow['decode']:.2f} thread-s), load {slow['load']:.2f} s"
    )
    return PeerResume(chosen.step, detail)


def prefetch_ahead(run_dir: Any, *, rank: int, topology: Mapping[str, int]) -> HeldSlots | None:
    """Tell this node's keeper the rank and topology this worker restarts with, so that it fetches
    what the restore will read from other nodes while the model is built (prefetch.py), and meanwhile
    map what the keeper holds for the restore (`HeldSlots.warm`, on a thread of its own). The slots
    are the restore's to read and close; None when no keeper takes it (none runs, or it knows no
    earlier incarnation)."""
    client = _keeper_client(run_dir, timeout=900.0)  # it waits for the prefetch
    if client is None:
        return None
    reply = ask(client, m.Prefetch(rank, dict(topology)))
    if reply is None or not reply.prefetching:
        client.close()
        return None
    held = HeldSlots(client, owned=True)
    threading.Thread(target=held.warm, args=(rank,), name="resurgo-warm-restore", daemon=True).start()
    return held


def previous_topology(run_dir: Any, *, comm: Comm) -> dict[str, int] | None:
    """The topology (and world size) of the newest incarnation any node's keeper still knows (collective).

    Asked before the trainer is built, so that a world that changed size can pick its new degrees
    from the one it resumes (`parallel.elastic`); None when no keeper answers or knows a plan.
    """
    newest = None
    reply = _ask_keeper(run_dir, m.Inventory(compact=True, wait=False))
    plans = [ErasureSetup.from_json(p) for p in (reply.plans if reply else [])]
    if plans:
        plan = max(plans, key=lambda p: p.created)
        newest = (plan.created, {**{k: int(v) for k, v in plan.topology.items()}, "world_size": plan.world_size})
    found = [n for n in comm.all_gather(newest) if n]
    return max(found, key=lambda n: n[0])[1] if found else None


def _ask_keeper(run_dir: Any, request: m.Request) -> Any:
    """One request to this node's keeper before the worker's own link exists; None when none answers."""
    client = _keeper_client(run_dir, timeout=30.0)
    try:
        return ask(client, request)
    finally:
        if client is not None:
            client.close()


def _keeper_client(run_dir: Any, *, timeout: float) -> Client | None:
    """A connection of its own to this node's keeper, None when none answers."""
    try:
        return Client(socket_path(run_id(run_dir)), timeout=timeout)
    except (KeeperGone, OSError):
        return None
