"""Which step the surviving nodes' memory can rebuild, and from where each lost rank comes back.

Pure: its inputs are the inventories that the surviving keepers report (held slots, complete parity,
metas) and the erasure plan of the incarnation that wrote them; no process is contacted. A rank of
that incarnation is back if some keeper still holds its slot, else if a replica's slot is held, else
if it was coded and every stripe its node fed still has k buffers (data segments of nodes that hold
all their coded ranks, or complete parity) and some survivor holds its node's meta.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .coding import ErasureSetup
from .plan import ErasurePlan


@dataclass(frozen=True)
class Source:
    """Where old rank `rank` comes from: a slot `held` on `node`, or `decoded` from node `node`'s stripes."""

    rank: int
    kind: str  # "held" | "decoded"
    node: str  # the holder (held) or the lost node (decoded)
    via: int  # the rank whose slot is read: itself, or a replica


@dataclass(frozen=True)
class MemoryPlan:
    plan: ErasureSetup
    erasure: ErasurePlan
    step: int
    sources: Mapping[int, Source]
    lost: tuple[str, ...]  # nodes of that incarnation whose memory is gone

    def describe(self) -> str:
        decoded = sorted({s.node for s in self.sources.values() if s.kind == "decoded"})
        return (
            f"step {self.step} of {self.plan.world_size} ranks on {len(self.plan.nodes)} nodes; lost "
            f"{', '.join(self.lost) or 'none'}; decoding {', '.join(decoded) or 'nothing'}"
        )


class Inventory:
    """One surviving keeper's report (the keeper's `inventory` reply)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.node = str(data.get("node", ""))
        self.address = str(data.get("address") or "")
        # A rank number is held twice when the running incarnation registered it anew with another
        # layout: its entry, and the earlier incarnation's, superseded but kept for a recovery.
        self.held: tuple[dict[int, Mapping[str, Any]], ...] = tuple(
            {int(r): v for r, v in data.get(kind, {}).items()} for kind in ("ranks", "superseded")
        )

    @property
    def ranks(self) -> set[int]:
        return {r for kind in self.held for r in kind}

    def steps(self) -> set[int]:
        return {s for kind in self.held for entry in kind.values() for s in entry["steps"]}

    def entry(
        self, rank: int, step: int, *, digest: str | None = None, superseded: bool = True
    ) -> Mapping[str, Any] | None:
        """What this keeper reports of `rank`'s slot of `step` (of layout `digest`, when given; held
        by the running incarnation only, unless `superseded`)."""
        for kind in self.held if superseded else self.held[:1]:
            held = kind.get(rank)
            if held is not None and step in held["steps"] and digest in (None, held["digest"]):
                return held
        return None

    def holds(self, rank: int, step: int, *, digest: str | None = None, superseded: bool = True) -> bool:
        return self.entry(rank, step, digest=digest, superseded=superseded) is not None

    def parity(self, token: str, step: int) -> dict[tuple[int, int], tuple[int, ...]]:
        """(stripe, parity) -> data segment lengths, for the complete parity buffers held here."""
        rows = self.data.get("parity", {}).get(token, {}).get(str(step), [])
        return {(int(r[0]), int(r[1])): tuple(int(x) for x in r[2:]) for r in rows}

    def metas(self, token: str, step: int) -> dict[str, dict[str, str]]:
        """node -> {rank: slot layout digest}, for the nodes whose meta of `step` is held here."""
        return dict(self.data.get("metas", {}).get(token, {}).get(str(step), {}))

    def digests(self, token: str) -> dict[int, str]:
        """rank -> slot layout digest in incarnation `token`, from the metas of any step held here
        (a rank's layout is the same for every step of an incarnation)."""
        found: dict[int, str] = {}
        for by_node in self.data.get("metas", {}).get(token, {}).values():
            for by_rank in by_node.values():
                found.update({int(r): d for r, d in by_rank.items()})
        return found

    def plans(self) -> list[ErasureSetup]:
        return [ErasureSetup.from_json(p) for p in self.data.get("plans", [])]


def choose(inventories: Sequence[Inventory], *, current: str) -> tuple[MemoryPlan | None, str]:
    """The newest rebuildable step of the newest earlier incarnation; else None and why not."""
    plans = {p.token: p for inv in inventories for p in inv.plans() if p.token != current}
    reasons = []
    for plan in sorted(plans.values(), key=lambda p: p.created, reverse=True):
        chosen, why = _choose_step(plan, inventories)
        if chosen is not None:
            return chosen, ""
        reasons.append(why)
    return None, "; ".join(reasons) or "no keeper holds an earlier incarnation's snapshots"


def absent(inventories: Sequence[Inventory], *, current: str) -> dict[str, str]:
    """Node -> keeper address, for the nodes of the newest earlier incarnation that no inventory
    comes from: lost, or alive but left out of this world (they joined the rendezvous late)."""
    plans = [p for inv in inventories for p in inv.plans() if p.token != current]
    if not plans:
        return {}
    newest = max(plans, key=lambda p: p.created)
    here = {inv.node for inv in inventories}
    return {node: newest.peers[node] for node in newest.nodes if node not in here and node in newest.peers}


def _choose_step(plan: ErasureSetup, inventories: Sequence[Inventory]) -> tuple[MemoryPlan | None, str]:
    erasure = plan.erasure()
    alive = {inv.node: inv for inv in inventories}
    steps = sorted({s for inv in inventories for s in inv.steps()}, reverse=True)
    lost = tuple(n for n in plan.nodes if n not in alive)
    first_reason = ""
    for step in steps:
        sources, missing = _sources(plan, erasure, alive, step)
        if not missing:
            return MemoryPlan(plan, erasure, step, sources, lost), ""
        if not first_reason:
            first_reason = (
                f"step {step}: ranks {missing[:8]} cannot be rebuilt (nodes lost: {', '.join(lost) or 'none'}; "
                f"each group survives {plan.m} lost)"
            )
    return None, first_reason or "no step is held in memory"


def _sources(
    plan: ErasureSetup, erasure: ErasurePlan, alive: Mapping[str, Inventory], step: int
) -> tuple[dict[int, Source], list[int]]:
    replica_of = {r: members for members in plan.replicas for r in members}
    # What each rank's slot looked like in that incarnation: a slot of another layout with the same
    # rank number is another incarnation's.
    digests: dict[int, str] = {}
    for inv in alive.values():
        digests.update(inv.digests(plan.token))
    holders: dict[int, str] = {}
    for node, inv in alive.items():
        for rank in inv.ranks:
            # A superseded slot is of an incarnation before the running one: taken only for the layout
            # that the plan's metas name, never for a plan that coded nothing.
            digest = digests.get(rank)
            if rank < plan.world_size and inv.holds(rank, step, digest=digest, superseded=digest is not None):
                holders.setdefault(rank, node)
    sources: dict[int, Source] = {}
    missing: list[int] = []
    for rank in range(plan.world_size):
        for via in (rank, *[r for r in replica_of.get(rank, ()) if r != rank]):
            if via in holders:
                sources[rank] = Source(rank, "held", holders[via], via)
                break
        else:
            node = _decodable_node(plan, erasure, alive, rank, step, holders)
            if node is None:
                missing.append(rank)
            else:
                sources[rank] = Source(rank, "decoded", node, rank)
    return sources, missing


def _decodable_node(
    plan: ErasureSetup,
    erasure: ErasurePlan,
    alive: Mapping[str, Inventory],
    rank: int,
    step: int,
    holders: Mapping[int, str],
) -> str | None:
    """The lost node whose stripes rebuild `rank` at `step`, None if they cannot."""
    node = next((c.node for c in erasure.coverage if rank in c.coded), None)
    group = erasure.group_of(node) if node else None
    if node is None or group is None or not any(node in inv.metas(plan.token, step) for inv in alive.values()):
        return None
    coded = {c.node: c.coded for c in erasure.coverage}

    def serves(member: str) -> bool:
        return member in alive and all(holders.get(r) == member for r in coded[member])

    for stripe_index, stripe in enumerate(group.stripes):
        if node not in (n for n, _ in stripe.data):
            continue
        data = sum(serves(n) for n, _ in stripe.data if n != node)
        parity = sum(
            h in alive and (stripe_index, p) in alive[h].parity(plan.token, step) for p, h in enumerate(stripe.parity)
        )
        if data + parity < plan.k:
            return None
    return node
