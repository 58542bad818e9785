"""Which node codes what, and where each parity buffer lives: a plan, as data, with no communication.

Nodes form groups of at least k+m. Within a group of n nodes there are n stripes; stripe s takes data
from the nodes at offsets 0..k-1 after position s and puts parity on the m nodes after those (RAID-5/6
style rotation). Each node cuts the state it codes into k segments, one per stripe it feeds, and holds
m parity segments: memory is balanced within every snapshot, and losing any m nodes of a group loses at
most m buffers of any stripe.

Data-parallel replicas are redundancy already: a replica set whose copies live on more than m nodes
survives any m losses and is not coded at all; otherwise one member is coded (the others need no
parity), chosen to keep the coded bytes balanced across nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from resurgo.checkpoint.erasure.code import check_shape


@dataclass(frozen=True)
class StripePlacement:
    """One stripe: data[t] = (node, segment of that node's coded state); parity[p] = node holding parity p."""

    data: tuple[tuple[str, int], ...]
    parity: tuple[str, ...]


@dataclass(frozen=True)
class GroupPlan:
    index: int
    k: int
    m: int
    nodes: tuple[str, ...]
    stripes: tuple[StripePlacement, ...]

    def describe(self) -> str:
        parity = " ".join(f"s{i}:{','.join(s.parity)}" for i, s in enumerate(self.stripes))
        return (
            f"group {self.index}: nodes {' '.join(self.nodes)} (k={self.k}, m={self.m}, survives any {self.m} "
            f"lost): each node codes its state in {self.k} segments and holds {self.m}/{self.k} of it as parity; "
            f"parity by stripe {parity}"
        )


@dataclass(frozen=True)
class NodeCoverage:
    """How a node's ranks survive: `coded` by parity, the others by copies of their state on the nodes
    listed in `copies` (none listed: the copy is a coded rank on this same node)."""

    node: str
    coded: tuple[int, ...]
    copies: tuple[tuple[int, tuple[str, ...]], ...]


@dataclass(frozen=True)
class ErasurePlan:
    k: int
    m: int
    groups: tuple[GroupPlan, ...]
    coverage: tuple[NodeCoverage, ...]

    def coded_on(self, node: str) -> tuple[int, ...]:
        """The ranks whose state `node` codes, in the order its coded stream holds them."""
        return next((c.coded for c in self.coverage if c.node == node), ())

    def group_of(self, node: str) -> GroupPlan | None:
        """The group a node belongs to; None when nothing needs parity."""
        return next((g for g in self.groups if node in g.nodes), None)

    def describe(self) -> str:
        """One line per group, then one per node whose ranks are covered by replicas."""
        lines = [g.describe() for g in self.groups]
        if not self.groups:
            lines.append(f"no parity: every rank's state has copies on more than m={self.m} nodes")
        for c in self.coverage:
            if c.copies:
                held = ", ".join(
                    f"rank {r} (copy on {'+'.join(nodes) or 'a coded rank here'})" for r, nodes in c.copies
                )
                lines.append(f"node {c.node}: replicated, no parity needed for {held}")
        return "\n".join(lines)


def plan_erasure(
    nodes: Sequence[str],
    ranks: Mapping[str, Sequence[int]],
    *,
    k: int,
    m: int,
    replicas: Sequence[Sequence[int]] = (),
) -> ErasurePlan:
    """Place k+m erasure coding over `nodes` (each with its local `ranks`); `replicas` lists sets of
    ranks that hold identical state (data-parallel replicas)."""
    check_shape(k, m)
    node_of = _node_of(nodes, ranks)
    coverage = _coverage(nodes, ranks, node_of, _replica_sets(replicas, node_of), m=m)
    if not any(c.coded for c in coverage):
        return ErasurePlan(k=k, m=m, groups=(), coverage=coverage)
    if len(nodes) < k + m:
        raise ValueError(
            f"k+m = {k}+{m} = {k + m} nodes are needed per erasure group, but there are {len(nodes)} nodes; "
            f"lower fault.erasure.data or fault.erasure.parity, or add nodes"
        )
    return ErasurePlan(k=k, m=m, groups=_groups(list(nodes), k=k, m=m), coverage=coverage)


def _node_of(nodes: Sequence[str], ranks: Mapping[str, Sequence[int]]) -> dict[int, str]:
    if not nodes or len(set(nodes)) != len(nodes):
        raise ValueError(f"nodes must be a non-empty list of distinct ids, got {list(nodes)}")
    if set(ranks) != set(nodes):
        raise ValueError(f"ranks must list the local ranks of exactly the nodes {list(nodes)}, got {sorted(ranks)}")
    node_of: dict[int, str] = {}
    for node in nodes:
        for rank in ranks[node]:
            if rank in node_of:
                raise ValueError(f"rank {rank} is listed on both {node_of[rank]} and {node}")
            node_of[rank] = node
    return node_of


def _replica_sets(replicas: Sequence[Sequence[int]], node_of: Mapping[int, str]) -> list[tuple[int, ...]]:
    """Every rank in exactly one set: the given replica sets, then singletons."""
    seen: set[int] = set()
    sets: list[tuple[int, ...]] = []
    for group in replicas:
        members = tuple(sorted(group))
        unknown = [r for r in members if r not in node_of]
        if unknown or seen & set(members) or len(set(members)) != len(members):
            raise ValueError(f"replica set {list(group)} names unknown or repeated ranks; each rank may appear once")
        seen |= set(members)
        sets.append(members)
    return sets + [(r,) for r in sorted(node_of) if r not in seen]


def _coverage(
    nodes: Sequence[str],
    ranks: Mapping[str, Sequence[int]],
    node_of: Mapping[int, str],
    sets: Sequence[tuple[int, ...]],
    *,
    m: int,
) -> tuple[NodeCoverage, ...]:
    coded: dict[str, list[int]] = {n: [] for n in nodes}
    copies: dict[int, tuple[str, ...]] = {}
    for members in sets:
        holders = sorted({node_of[r] for r in members}, key=list(nodes).index)
        if len(holders) > m:
            chosen = None
        else:
            chosen = min(members, key=lambda r: (len(coded[node_of[r]]), r))
            coded[node_of[chosen]].append(chosen)
        for r in members:
            if r != chosen:
                copies[r] = tuple(n for n in holders if n != node_of[r])
    return tuple(
        NodeCoverage(
            node=n,
            coded=tuple(sorted(coded[n])),
            copies=tuple((r, copies[r]) for r in sorted(ranks[n]) if r in copies),
        )
        for n in nodes
    )


def _groups(nodes: list[str], *, k: int, m: int) -> tuple[GroupPlan, ...]:
    """Contiguous groups of at least k+m nodes, the remainder spread one per group."""
    count = len(nodes) // (k + m)
    base, extra = divmod(len(nodes), count)
    groups, start = [], 0
    for index in range(count):
        size = base + (index < extra)
        members = tuple(nodes[start : start + size])
        start += size
        groups.append(GroupPlan(index=index, k=k, m=m, nodes=members, stripes=_stripes(members, k=k, m=m)))
    return tuple(groups)


def _stripes(members: tuple[str, ...], *, k: int, m: int) -> tuple[StripePlacement, ...]:
    n = len(members)
    return tuple(
        StripePlacement(
            data=tuple((members[(s + t) % n], t) for t in range(k)),
            parity=tuple(members[(s + k + p) % n] for p in range(m)),
        )
        for s in range(n)
    )
