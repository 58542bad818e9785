"""Erasure placement: balanced parity, any m lost nodes recoverable, replicas counted as redundancy."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resurgo.checkpoint.erasure.plan import ErasurePlan, plan_erasure


def _cluster(nodes: int, per_node: int) -> tuple[list[str], dict[str, list[int]]]:
    names = [f"node{i}" for i in range(nodes)]
    return names, {n: list(range(i * per_node, (i + 1) * per_node)) for i, n in enumerate(names)}


def _check_placement(plan: ErasurePlan) -> None:
    for group in plan.groups:
        assert len(group.nodes) >= plan.k + plan.m and len(group.stripes) == len(group.nodes)
        data, parity = Counter(), Counter()
        segments: dict[str, set[int]] = {n: set() for n in group.nodes}
        for stripe in group.stripes:
            holders = [n for n, _ in stripe.data] + list(stripe.parity)
            assert len(set(holders)) == plan.k + plan.m, "two buffers of one stripe on one node"
            assert set(holders) <= set(group.nodes)
            for node, segment in stripe.data:
                data[node] += 1
                segments[node].add(segment)
            parity.update(stripe.parity)
        assert all(data[n] == plan.k and parity[n] == plan.m for n in group.nodes), "unbalanced"
        assert all(segments[n] == set(range(plan.k)) for n in group.nodes)


@pytest.mark.parametrize(("nodes", "sizes"), [(6, [6]), (12, [6, 6]), (13, [7, 6]), (17, [9, 8])])
def test_groups_cover_every_node_and_balance_parity(nodes: int, sizes: list[int]) -> None:
    names, ranks = _cluster(nodes, 2)
    plan = plan_erasure(names, ranks, k=4, m=2)
    assert [len(g.nodes) for g in plan.groups] == sizes
    assert sorted(n for g in plan.groups for n in g.nodes) == sorted(names)
    _check_placement(plan)
    lines = plan.describe().splitlines()
    assert len(lines) == len(sizes) and all("k=4, m=2" in line for line in lines)


def test_parity_rotates_like_raid6() -> None:
    names, ranks = _cluster(6, 1)
    group = plan_erasure(names, ranks, k=4, m=2).groups[0]
    assert [s.parity for s in group.stripes[:3]] == [("node4", "node5"), ("node5", "node0"), ("node0", "node1")]
    assert group.stripes[1].data[0] == ("node1", 0)


def test_too_few_nodes_is_refused_with_what_to_change() -> None:
    names, ranks = _cluster(5, 8)
    with pytest.raises(ValueError, match=r"4\+2 = 6 nodes are needed.*5 nodes"):
        plan_erasure(names, ranks, k=4, m=2)


def test_replicas_on_more_than_m_nodes_need_no_parity() -> None:
    names, ranks = _cluster(4, 2)
    plan = plan_erasure(names, ranks, k=2, m=1, replicas=[[0, 4], [1, 5], [2, 6], [3, 7]])
    assert plan.groups == () and all(not c.coded for c in plan.coverage)
    assert plan.coverage[0].copies == ((0, ("node2",)), (1, ("node2",)))
    assert "replicated, no parity needed for rank 0 (copy on node2)" in plan.describe()


def test_replicas_on_at_most_m_nodes_code_one_member_each_balanced() -> None:
    names, ranks = _cluster(4, 2)
    plan = plan_erasure(names, ranks, k=2, m=2, replicas=[[0, 4], [1, 5], [2, 6], [3, 7]])
    coded = [r for c in plan.coverage for r in c.coded]
    assert len(coded) == 4 and {r % 4 for r in coded} == {0, 1, 2, 3}
    assert [len(c.coded) for c in plan.coverage] == [1, 1, 1, 1]
    _check_placement(plan)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": ["a", "a"], "ranks": {"a": [0]}}, "distinct"),
        ({"nodes": [], "ranks": {}}, "non-empty"),
        ({"nodes": ["a", "b"], "ranks": {"a": [0]}}, "exactly the nodes"),
        ({"nodes": ["a", "b"], "ranks": {"a": [0], "b": [0]}}, "both a and b"),
        ({"nodes": ["a", "b"], "ranks": {"a": [0], "b": [1]}, "replicas": [[0, 9]]}, "unknown or repeated"),
        ({"nodes": ["a", "b"], "ranks": {"a": [0], "b": [1]}, "replicas": [[0, 1], [1]]}, "unknown or repeated"),
        ({"nodes": ["a", "b"], "ranks": {"a": [0], "b": [1]}, "k": 0}, "k=0"),
        ({"nodes": ["a", "b"], "ranks": {"a": [0], "b": [1]}, "m": 5}, "m=5"),
    ],
)
def test_bad_input_is_refused(kwargs: dict, message: str) -> None:
    args = {"k": 1, "m": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        plan_erasure(args.pop("nodes"), args.pop("ranks"), **args)


@settings(max_examples=60, deadline=None)
@given(
    nodes=st.integers(1, 14),
    per_node=st.integers(1, 3),
    k=st.integers(1, 6),
    m=st.integers(1, 3),
    replicate=st.sampled_from([1, 2, 3]),
)
def test_any_m_lost_nodes_leave_every_rank_recoverable(
    nodes: int, per_node: int, k: int, m: int, replicate: int
) -> None:
    names, ranks = _cluster(nodes, per_node)
    world = nodes * per_node
    stride = world // replicate if world % replicate == 0 else world
    replicas = [[r + i * stride for i in range(world // stride)] for r in range(stride)] if stride < world else []
    try:
        plan = plan_erasure(names, ranks, k=k, m=m, replicas=replicas)
    except ValueError as err:
        assert nodes < k + m and "nodes are needed" in str(err)
        return
    _check_placement(plan)
    node_of = {r: n for n, rs in ranks.items() for r in rs}
    coded = {r for c in plan.coverage for r in c.coded}
    sets = replicas or [[r] for r in range(world)]
    for lost in itertools.combinations(names, min(m, nodes)):
        for members in sets:
            alive = any(node_of[r] not in lost for r in members)
            assert alive or coded & set(members), (lost, members)
