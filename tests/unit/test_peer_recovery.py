"""Erasure-coded memory across nodes, in one process: real keepers' coders talking TCP on loopback.

Each simulated node runs a `ParityService` over fake slots (the bytes a keeper would hold); nodes are
lost by stopping theirs. What survives is then read back onto a new topology, exactly."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from resurgo.checkpoint.erasure import code as erasure
from resurgo.checkpoint.erasure import parity_buffer
from resurgo.checkpoint.erasure.coding import ErasureSetup
from resurgo.checkpoint.erasure.parity_buffer import Pace, ParityBuffer
from resurgo.checkpoint.erasure.peer_plan import Inventory, absent, choose
from resurgo.checkpoint.erasure.peer_read import PeerReader, merged_trees
from resurgo.checkpoint.erasure.reshard import fill_targets
from resurgo.checkpoint.erasure.service import ParityService
from resurgo.checkpoint.erasure.wire import PeerClient, PeerError
from resurgo.checkpoint.errors import WorldIncomplete
from resurgo.checkpoint.keeper.prefetch import (
    merge,
    new_fragment,
    prefetch_rank,
    prefetch_spans,
    restore_reads,
    subtract,
)
from resurgo.checkpoint.keeper.rebuild import plan_rebuild, probe, rebuild_rank, rebuilder
from resurgo.checkpoint.recovery.peers import _refuse_without_answering_nodes, replica_sets
from resurgo.checkpoint.state import checksum
from resurgo.checkpoint.state.layout import MeshSpec, Placement, TensorLayout
from resurgo.checkpoint.state.slot_layout import SlotLayout

SHAPES = {"model/w": (13, 7), "model/b": (5,), "optim/step": ()}  # 13 rows: uneven on any world size


def layouts(world: int) -> dict[str, TensorLayout]:
    mesh = MeshSpec(("dp_shard",), (world,), tuple(range(world)))
    return {
        "model/w": TensorLayout("model/w", SHAPES["model/w"], "float32", mesh, (Placement("shard", 0),)),
        "model/b": TensorLayout("model/b", SHAPES["model/b"], "float32", mesh, (Placement("replicate"),)),
        "optim/step": TensorLayout("optim/step", (), "int64"),
    }


def global_state(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "model/w": rng.standard_normal(SHAPES["model/w"]).astype(np.float32),
        "model/b": rng.standard_normal(SHAPES["model/b"]).astype(np.float32),
        "optim/step": np.array(step, dtype=np.int64),
    }


def local(array: np.ndarray, fragment) -> np.ndarray:
    out = np.empty(fragment.local_shape, dtype=array.dtype)
    for box, slices in fragment.pieces():
        out[slices] = array[box.slices()]
    return out


def rank_slot(rank: int, world: int, step: int) -> tuple[SlotLayout, np.ndarray]:
    state = global_state(step)
    specs, parts = [], []
    for name, layout in layouts(world).items():
        fragment = layout.fragment(rank)
        data = local(state[name], fragment)
        specs.append((name, layout.dtype, data.shape, data.nbytes, fragment.to_json()))
        parts.append(data)
    slot_layout = SlotLayout.build(specs)
    slot = np.zeros(slot_layout.nbytes, dtype=np.uint8)
    for entry, data in zip(slot_layout.entries, parts):
        slot[entry.offset : entry.offset + entry.nbytes] = data.reshape(-1).view(np.uint8)
    return slot_layout, slot


class Cluster:
    """Nodes of one incarnation: each a ParityService over the slots its ranks would hold."""

    def __init__(self, *, nodes: int, per_node: int, k: int, m: int, replicas=(), site: str = "host") -> None:
        self.names = [f"node{i}" for i in range(nodes)]
        self.world = nodes * per_node
        self.ranks = {n: tuple(range(i * per_node, (i + 1) * per_node)) for i, n in enumerate(self.names)}
        self.slots: dict[str, dict[tuple[int, int], tuple[SlotLayout, np.ndarray]]] = {n: {} for n in self.names}
        self.superseded: dict[str, dict[tuple[int, int], tuple[SlotLayout, np.ndarray]]] = {n: {} for n in self.names}
        self.protectors = {
            n: ParityService(
                node=n,
                host="127.0.0.1",
                slot_source=self._source(n),
                on_protected=lambda: None,
                report=lambda n=n, **fields: self.report(n, **fields),
            )
            for n in self.names
        }
        for p in self.protectors.values():
            p.start()
        self.plan = ErasureSetup(
            token="aaaa",
            created=1.0,
            secret="s3cret",
            nodes=tuple(self.names),
            ranks=self.ranks,
            replicas=tuple(replicas),
            k=k,
            m=m,
            peers={n: p.address for n, p in self.protectors.items()},
            world_size=self.world,
            topology={"pp": 1, "dp_replicate": 1, "dp_shard": self.world, "tp": 1},
            site=site,
        )
        for p in self.protectors.values():
            p.protect(self.plan)
        self.alive = set(self.names)

    def _source(self, node):
        def held(rank: int, step: int) -> np.ndarray | None:
            found = self.slots[node].get((rank, step)) or self.superseded[node].get((rank, step))
            return None if found is None else found[1]

        return held

    def reregister(self, node: str, *, world: int, step: int) -> None:
        """`node`'s ranks registered anew by an incarnation of `world` ranks (another layout), which
        took a snapshot of `step`: its keeper keeps the slots of the last one as superseded."""
        self.superseded[node] = self.slots[node]
        self.slots[node] = {(r, step): rank_slot(r, world, step) for r in self.ranks[node]}

    def snapshot(self, step: int, *, nodes=None, wait: bool = True, shares_token: str | None = None) -> None:
        """Every node (of `nodes`) codes `step`; with a device-site plan its workers scale the shares,
        under `shares_token` when given (another incarnation's recipe: they must go unused)."""
        for node in nodes or self.names:
            ranks, shares = {}, {}
            for r in self.ranks[node]:
                self.slots[node][(r, step)] = rank_slot(r, self.world, step)
                layout, slot = self.slots[node][(r, step)]
                ranks[r] = (layout, slot, {"train": {"step": step, "rank": r}})
            sizes = {r: layout.nbytes for r, (layout, _, _) in ranks.items()}
            for r, (_, slot, _) in ranks.items():
                if (recipe := self.protectors[node].share_recipe(r, sizes)) is not None:
                    out = np.full(recipe.rows * recipe.nbytes, 0xA5, dtype=np.uint8)
                    recipe.scale(slot, out)
                    shares[r] = (shares_token or recipe.token, out)
            sums = {r: checksum.checksums(slot, layout) for r, (layout, slot, _) in ranks.items()}
            while not self.protectors[node].submit(step, ranks, lambda: None, shares, sums=sums):
                time.sleep(0.01)
        deadline = time.monotonic() + 30
        while wait and any(
            self.protectors[n].protected_step() < step for n in self.alive if self.plan.erasure().groups
        ):
            assert time.monotonic() < deadline, "parity never completed"
            time.sleep(0.01)

    def lose(self, *nodes: str) -> None:
        for node in nodes:
            self.protectors[node].stop()
            self.alive.discard(node)

    def report(self, node: str, *, compact: bool = False, ranks=None, step=None) -> dict:
        """`node`'s inventory as its keeper reports it (restore_ahead.py `_inventory`)."""

        def describe(slots) -> dict:
            held = {}
            for (r, at), (layout, slot) in slots.items():
                if ranks is None or r in ranks:
                    entry = held.setdefault(str(r), {"steps": [], "digest": layout.digest})
                    entry["steps"].append(at)
                    if not compact:
                        entry["layout"] = layout.to_json()
                        if step in (None, at):
                            entry.setdefault("trees", {})[str(at)] = {"train": {"step": at, "rank": r}}
                            entry.setdefault("sums", {})[str(at)] = checksum.checksums(slot, layout)
            return held

        return {
            "ranks": describe(self.slots[node]),
            "superseded": describe(self.superseded[node]),
            **self.protectors[node].inventory(),
        }

    def inventories(self, *, compact: bool = False) -> dict[str, Inventory]:
        return {node: Inventory(self.report(node, compact=compact)) for node in sorted(self.alive)}

    def close(self) -> None:
        self.lose(*list(self.alive))


@pytest.fixture
def cluster():
    made = []

    def make(**kwargs) -> Cluster:
        made.append(Cluster(**kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def assert_restores(
    c: Cluster, *, step: int, new_world: int, on: str | None = None, compact: bool = False, reads=None
) -> PeerReader:
    """Every rank of a `new_world`-rank topology gets exactly its slice of the state of `step`; the
    reader runs `on` a node, copying that node's own slots from its memory instead of a socket.
    `compact`: from inventories without layouts and JSON (the reader asks the holders for them);
    `reads(rank)`: the old ranks each new rank is expected to read."""
    inventories = c.inventories(compact=compact)
    chosen, why = choose(list(inventories.values()), current="bbbb")
    assert chosen is not None, why
    assert chosen.step == step
    expected = global_state(step)

    def held_here(rank: int, at: int) -> np.ndarray | None:
        slot = c.slots[on].get((rank, at))
        return None if slot is None else slot[1]

    reader = PeerReader(chosen, inventories, secret=c.plan.secret, node=on, local=held_here if on else None)
    try:
        for rank in range(new_world):
            targets = {}
            for name, layout in layouts(new_world).items():
                fragment = layout.fragment(rank)
                targets[name] = (fragment, np.full(fragment.local_shape, -1, dtype=expected[name].dtype))
            fill_targets(reader, targets, ranks=reads(rank) if reads else None)
            for name, (fragment, out) in targets.items():
                np.testing.assert_array_equal(out, local(expected[name], fragment), err_msg=name)
        assert (
            merged_trees(reader, rank=0, same_topology=False, ranks=reads(0) if reads else None)["train"]["step"]
            == step
        )
    finally:
        reader.close()
    return reader


def test_one_lost_node_of_three_rebuilds_onto_fewer_ranks(cluster):
    c = cluster(nodes=3, per_node=2, k=2, m=1)
    c.snapshot(1)
    c.snapshot(2)
    c.lose("node1")
    assert assert_restores(c, step=2, new_world=4).local_bytes == 0
    reader = assert_restores(c, step=2, new_world=4, on="node0")
    assert reader.local_bytes > 0 and reader.fetched > 0  # node0's own slots from memory, the rest over TCP
    chosen, _ = choose(list(c.inventories().values()), current="bbbb")
    assert {s.kind for r, s in chosen.sources.items() if r in c.ranks["node1"]} == {"decoded"}


def test_a_restore_from_compact_inventories_asks_only_for_the_old_ranks_it_reads(cluster):
    c = cluster(nodes=3, per_node=2, k=2, m=1)
    c.snapshot(1)
    c.lose("node2")
    reader = assert_restores(c, step=1, new_world=6, on="node0", compact=True, reads=lambda rank: [rank])
    assert set(reader._described) == {("node0", 0), ("node0", 1), ("node1", 2), ("node1", 3)}  # 4, 5: decoded
    # An expectation that misses old ranks falls back to all of them, and the state is still exact.
    assert_restores(c, step=1, new_world=2, compact=True, reads=lambda rank: [5])


def test_two_lost_nodes_of_four_with_two_parities(cluster):
    c = cluster(nodes=4, per_node=1, k=2, m=2)
    c.snapshot(3)
    c.lose("node1", "node3")
    assert_restores(c, step=3, new_world=2)
    assert_restores(c, step=3, new_world=4)  # same world size: a replacement node reads the same way


def test_more_lost_than_parity_is_refused_with_the_ranks(cluster):
    c = cluster(nodes=3, per_node=1, k=2, m=1)
    c.snapshot(1)
    c.lose("node0", "node2")
    chosen, why = choose(list(c.inventories().values()), current="bbbb")
    assert chosen is None
    assert "ranks [0, 2] cannot be rebuilt" in why and "node0, node2" in why


def test_a_node_left_out_of_the_world_whose_keeper_answers_asks_for_a_new_round(cluster):
    """Survivors of a hung node can reach a rendezvous a moment apart, and a round may close
    without one of them: memory then cannot rebuild the run from the world alone, but the node
    left out is alive, so the verdict is a restart of the round, not a refusal to go on."""
    c = cluster(nodes=3, per_node=1, k=2, m=1)
    c.snapshot(1)
    c.lose("node0")  # hung or dead: its keeper does not answer
    here = [c.inventories()["node1"]]  # node2 is alive but missed the round
    assert choose(here, current="bbbb")[0] is None
    assert absent(here, current="bbbb") == {n: c.plan.peers[n] for n in ("node0", "node2")}
    world_of_one = type("One", (), {"rank": 0, "all_gather": lambda self, mine: [mine]})()
    with pytest.raises(WorldIncomplete, match="without node2, whose keepers answer"):
        _refuse_without_answering_nodes(world_of_one, here, token="bbbb", why="ranks [0, 2] cannot be rebuilt")
    c.lose("node2")  # now both are gone: the refusal is memory's verdict, with no restart asked
    _refuse_without_answering_nodes(world_of_one, here, token="bbbb", why="")


def test_a_node_lost_during_the_exchange_falls_back_to_the_newest_protected_step(cluster):
    c = cluster(nodes=3, per_node=1, k=2, m=1)
    c.snapshot(1)
    c.snapshot(2, nodes=["node0", "node1"], wait=False)  # node2 dies before it codes step 2
    time.sleep(0.3)
    c.lose("node2")
    assert_restores(c, step=1, new_world=2)


@pytest.mark.parametrize("compact", [False, True])
def test_a_node_lost_before_a_regrown_job_protects_a_step_comes_back_from_the_last_ones(cluster, compact):
    """The job grew back to more nodes (every rank's layout changed) and lost a node before that
    incarnation protected a step: the survivors' superseded slots of the last one, whose layouts its
    metas name, and its parity rebuild the step it protected. A plan that coded nothing never takes
    a superseded slot for its own, although the rank numbers match."""
    c = cluster(nodes=2, per_node=2, k=1, m=1)
    c.snapshot(1)
    grown = plan_of("gggg", 2.0, {"node0": (0, 1), "node1": (2, 3), "node2": (4, 5)})
    for node in c.names:
        c.reregister(node, world=6, step=2)
        c.protectors[node].protect(replace(grown, peers=c.plan.peers))  # it codes nothing before the loss
    c.lose("node1")
    assert_restores(c, step=1, new_world=2, on="node0", compact=compact)
    chosen, _ = choose(list(c.inventories().values()), current="cccc")
    assert chosen.plan.token == c.plan.token
    assert [chosen.sources[r].kind for r in range(4)] == ["held", "held", "decoded", "decoded"]
    node0 = c.inventories()["node0"]
    assert not node0.holds(0, 1, superseded=False) and node0.holds(0, 1, digest=rank_slot(0, 4, 1)[0].digest)


def test_replicas_need_no_parity(cluster):
    c = cluster(nodes=2, per_node=1, k=1, m=1, replicas=[(0, 1)])
    assert not c.plan.erasure().groups
    c.snapshot(4, wait=False)
    c.lose("node1")
    chosen, _ = choose(list(c.inventories().values()), current="bbbb")
    assert chosen.sources[1].kind == "held" and chosen.sources[1].via == 0


def lone_service(node: str) -> ParityService:
    """A node's parity service with no slots and no server: for what it decides, not what it sends."""
    return ParityService(node=node, host="127.0.0.1", slot_source=lambda r, s: None, on_protected=lambda: None)


def plan_of(token: str, created: float, ranks: dict[str, tuple[int, ...]], *, k: int = 1) -> ErasureSetup:
    """A plan over `ranks` (node -> its ranks; the first node leads), one parity, no peers to reach."""
    world = sum(len(r) for r in ranks.values())
    return ErasureSetup(
        token=token, created=created, secret="x", nodes=tuple(ranks), ranks=ranks, replicas=(), k=k, m=1, peers={},
        world_size=world, topology={},
    )  # fmt: skip


def test_a_failed_recovery_keeps_the_incarnation_it_read():
    """Plans of incarnations that never protected a step do not push out the one holding the state."""
    p = lone_service("node0")
    ranks = {"node0": (0,), "node1": (1,)}
    p.protect(plan_of("01", 1.0, ranks))
    p.protected["01"] = 5
    for i, token in enumerate(["02", "03", "04"]):
        p.protect(plan_of(token, 2.0 + i, ranks))
    assert set(p.plans) == {"01", "04"}


def test_replica_sets_follow_the_mesh():
    assert replica_sets({"pp": 1, "dp_replicate": 2, "dp_shard": 2, "tp": 1}, 4) == ((0, 2), (1, 3))
    assert replica_sets({"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 1}, 4) == ()


def test_a_survivor_rebuilds_a_lost_nodes_ranks_ahead_and_recovery_reads_them_as_held(cluster):
    c = cluster(nodes=3, per_node=1, k=2, m=1)
    c.snapshot(1)
    c.snapshot(2)
    c.lose("node2")
    own = c.inventories()["node0"].data
    assert set(probe(c.plan, node="node0", own=own)) == {"node0", "node1"}  # node2's keeper does not answer
    inventories = c.inventories()
    assert plan_rebuild(inventories, node="node0")[1] == []
    chosen, ranks = plan_rebuild(inventories, node="node1")  # the survivor nearest before node2
    assert ranks == [2]
    held = lambda rank, at: (c.slots["node1"].get((rank, at)) or (None, None))[1]  # noqa: E731
    done, data = rebuild_rank(
        chosen, inventories, rank=2, node="node1", local=held, allocate=lambda n: np.zeros(n, dtype=np.uint8)
    )
    layout, slot = rank_slot(2, 3, 2)
    assert (done.step, done.layout.digest) == (2, layout.digest) and done.tree == {"train": {"step": 2, "rank": 2}}
    np.testing.assert_array_equal(data, slot)
    c.slots["node1"][(2, 2)] = (done.layout, data)  # what the keeper then holds and reports
    assert plan_rebuild(c.inventories(), node="node1")[1] == []  # held now: nothing left to rebuild
    reader = assert_restores(c, step=2, new_world=2, on="node1")
    assert reader.decoded == 0


def test_the_rebuilder_is_the_nearest_survivor_before_the_lost_node_else_after():
    nodes = ["a", "b", "c", "d"]
    assert rebuilder(nodes, "d", ["a", "b", "c"]) == "c"
    assert rebuilder(nodes, "a", ["b", "c", "d"]) == "b"
    assert rebuilder(nodes, "c", ["a", "d"]) == "a"
    assert rebuilder(nodes, "b", []) is None


def test_a_resized_rank_holds_the_same_placements_on_the_new_mesh():
    shard = (Placement("shard", 0), Placement("shard", 1))
    old = {"pp": 1, "dp_replicate": 1, "dp_shard": 3, "tp": 2}
    new = {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 2}
    w = TensorLayout("w", (12, 8), "float32", MeshSpec(("dp_shard", "tp"), (3, 2), tuple(range(6))), shard)
    for rank in range(4):
        expected = TensorLayout("w", (12, 8), "float32", MeshSpec(("dp_shard", "tp"), (2, 2), tuple(range(4))), shard)
        assert (
            new_fragment(w, old=old, new=new, rank=rank, holders=range(6)).segments == expected.fragment(rank).segments
        )
    # Two pipeline stages: a tensor of stage 1 is held by the new stage-1 ranks only, on their submesh.
    old, new = {"pp": 2, "dp_shard": 3}, {"pp": 2, "dp_shard": 2}
    v = TensorLayout("v", (10,), "float32", MeshSpec(("dp_shard",), (3,), (3, 4, 5)), (Placement("shard", 0),))
    assert new_fragment(v, old=old, new=new, rank=0, holders=(3, 4, 5)) is None
    assert new_fragment(v, old=old, new=new, rank=3, holders=(3, 4, 5)).segments == (((5, 10),),)
    plain = TensorLayout("s", (), "int64")
    assert new_fragment(plain, old=old, new=new, rank=1, holders=(3, 4, 5)) is None
    assert new_fragment(plain, old=old, new=new, rank=2, holders=(3, 4, 5)) is not None
    assert new_fragment(v, old=old, new={"pp": 1, "dp_shard": 4}, rank=0, holders=(3, 4, 5)) is None  # stages regrouped


def test_survivors_prefetch_what_their_new_ranks_read_from_peers(cluster):
    c = cluster(nodes=3, per_node=1, k=2, m=1)
    c.snapshot(1)
    c.lose("node2")
    inventories = c.inventories()
    chosen, _ = choose(list(inventories.values()), current="bbbb")
    topology = {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 1}
    for node, new_rank in (("node0", 0), ("node1", 1)):
        held = lambda rank, at, node=node: (c.slots[node].get((rank, at)) or (None, None))[1]  # noqa: E731
        fetcher = PeerReader(chosen, inventories, secret=c.plan.secret, node=node, local=held)
        reads = restore_reads(fetcher, topology=topology, ranks=[new_rank])
        assert set(reads[new_rank]) & set(c.ranks[node])  # it reads its own node's old ranks too
        spans = prefetch_spans(reads, held=lambda r: held(r, 1) is not None)
        assert spans and all(r not in c.ranks[node] for r in spans)  # only what other nodes hold, or held
        pieces = {
            r: prefetch_rank(fetcher, rank=r, spans=s, allocate=lambda n: np.zeros(n, dtype=np.uint8))[:2]
            for r, s in spans.items()
        }
        fetcher.close()

        def prefetched(rank, at, offset, nbytes, pieces=pieces):
            piece, data = pieces.get(rank, (None, None))
            where = piece.find(offset, nbytes) if piece is not None and piece.step == at else None
            return None if where is None else data[where : where + nbytes]

        reader = PeerReader(chosen, inventories, secret=c.plan.secret, node=node, local=held, prefetched=prefetched)
        expected = global_state(1)
        targets = {}
        for name, layout in layouts(2).items():
            fragment = layout.fragment(new_rank)
            targets[name] = (fragment, np.full(fragment.local_shape, -1, dtype=expected[name].dtype))
        fill_targets(reader, targets)
        reader.close()
        for name, (fragment, out) in targets.items():
            np.testing.assert_array_equal(out, local(expected[name], fragment), err_msg=name)
        assert reader.fetched == 0 and reader.local_bytes > 0, node  # nothing left to read over TCP


def test_spans_merge_and_subtract():
    assert merge([(5, 9), (0, 3), (3, 4), (8, 12)]) == [(0, 4), (5, 12)]
    assert subtract([(0, 10), (20, 30)], [(2, 4), (8, 22)]) == [(0, 2), (4, 8), (22, 30)]
    assert subtract([(0, 10)], []) == [(0, 10)]


def test_spares_of_an_earlier_layout_give_way_to_buffers_the_next_step_fits():
    p = lone_service("node0")
    p._spare = [np.zeros(5, dtype=np.uint8)]  # the size an earlier incarnation's segments had
    for step in (1, 2):
        p._parity[("t", step, 0, 0)] = ParityBuffer(np.zeros(20, dtype=np.uint8))
    step1 = p._parity[("t", 1, 0, 0)].data
    p._evict("t", 2)
    assert [s.size for s in p._spare] == [20]  # step 1's buffer, for step 3 to fill
    reused = p._new_parity(20)
    assert reused.data is step1 and not reused.filled and not p._spare  # reused, not fresh pages


@pytest.mark.parametrize("m", [1, 3])
def test_a_parity_summed_piece_by_piece_in_any_order_equals_the_encoded_one(monkeypatch, m):
    """Shares of unequal lengths, their pieces interleaved at random, added into a buffer holding an
    earlier step's bytes (never cleared first), and a longer share arriving after a shorter one."""
    monkeypatch.setattr(parity_buffer, "PIECE_BYTES", 8)
    rng = np.random.default_rng(3)
    k, lengths = 3, (29, 40, 17)
    data = [rng.integers(0, 256, n, dtype=np.uint8) for n in lengths]
    for parity in range(m):
        want = erasure.encode(data, m=m, pad=True).parity[parity]
        pieces = [(t, o) for t, d in enumerate(data) for o in range(0, d.size, 8)]
        order = [pieces[i] for i in rng.permutation(len(pieces))]
        order.sort(key=lambda tp: tp[0] == 1)  # segment 1 (the longest) last: the buffer grows
        buf = ParityBuffer(rng.integers(0, 256, lengths[order[0][0]], dtype=np.uint8))  # stale bytes
        for t, offset in order:
            if lengths[t] > buf.data.size:
                buf.grow(lengths[t])
            buf.add(offset, data[t][offset : offset + 8], k=k, m=m, parity=parity, index=t)
        assert np.array_equal(buf.data, want), parity
    with pytest.raises(ValueError, match="off the 8-byte grid"):
        buf.add(4, data[0][:8], k=k, m=m, parity=0, index=0)


def test_a_step_of_ranks_the_plan_does_not_code_here_is_not_taken():
    """A keeper that adopted the new incarnation's plan may still be handed a step of ranks numbered
    as before (its workers are registering): refused, the coder left free for the next step."""
    p = lone_service("node0")
    # node0 leads (it codes whenever a step is due); its rank was 0 in the incarnation before
    p.protect(plan_of("02", 1.0, {"node0": (1,), "node1": (0,)}))
    assert not p.submit(2, {0: (None, np.zeros(8, np.uint8), {})}, lambda: None)
    assert p.coding_step() == -1


def two_plans() -> tuple[ErasureSetup, ErasureSetup]:
    """Two incarnations' plans: three nodes, then the two left after node2's loss; node0 leads both."""
    old = plan_of("01", 1.0, {"node0": (0,), "node1": (1,), "node2": (2,)}, k=2)
    return old, plan_of("02", 2.0, {"node0": (0,), "node1": (1,)})


def test_a_follower_codes_the_step_announced_while_it_sent_the_last_incarnations():
    """A follower still sending a step of the last incarnation when the next one's leader announced
    its first step codes that step next, though its number is no newer than the one it was sending."""
    p = lone_service("node1")
    old, new = two_plans()
    p.protect(old)
    p.protect(new)
    p._announced[new.token] = 480  # the new leader's first step, announced while step 480 of the old one was sent
    assert p._missed_announcement(old.token, 480) == 480
    assert p._missed_announcement(new.token, 480) == -1  # that very step, just coded
    assert p._missed_announcement(new.token, 479) == 480


def test_a_new_plan_aborts_requests_to_the_nodes_it_left_out():
    """A request to a hung node of the last incarnation would hold the coder until its timeout."""
    from unittest import mock

    p = lone_service("node0")
    old, new = two_plans()
    p.protect(old)
    p._clients = {"node1": mock.Mock(), "node2": mock.Mock()}
    p.protect(new)
    p._clients["node2"].abort.assert_called_once()
    p._clients["node1"].abort.assert_not_called()


def test_a_new_plan_frees_a_leader_waiting_on_the_last_incarnations_parity(cluster):
    """A node dies after the leader sent its shares: that parity never completes. The survivors'
    next plan must be coded at once, not after the leader's wait for the dead one runs out."""
    c = cluster(nodes=3, per_node=1, k=2, m=1)
    leader = c.protectors["node0"]
    c.slots["node0"][(0, 2)] = rank_slot(0, c.world, 2)
    assert leader.submit(2, {0: (*c.slots["node0"][(0, 2)], {"train": {"step": 2}})}, lambda: None)
    deadline = time.monotonic() + 30
    while leader.coded_step() < 2:  # shares sent; the followers never send theirs
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert leader.coding_step() == 2  # waiting for step 2 to be protected
    survivors = replace(
        c.plan,
        token="bbbb",
        created=2.0,
        k=1,
        nodes=("node0", "node1"),
        ranks={"node0": (0,), "node1": (1,)},
        peers={n: c.protectors[n].address for n in ("node0", "node1")},
        world_size=2,
        topology={**c.plan.topology, "dp_shard": 2},
    )
    leader.protect(survivors)
    while leader.coding_step() != -1:
        assert time.monotonic() < deadline - 20, "the leader still waits on the dead incarnation's parity"
        time.sleep(0.01)
    c.slots["node0"][(0, 3)] = rank_slot(0, 2, 3)
    assert leader.submit(3, {0: (*c.slots["node0"][(0, 3)], {"train": {"step": 3}})}, lambda: None)
    while leader.coding_step() != -1:  # node1 knows no plan "bbbb" and refuses: the coder goes on
        assert time.monotonic() < deadline, "the coder stopped with the old plan"
        time.sleep(0.01)


def test_a_keeper_serves_the_secrets_of_the_plans_it_holds_and_no_other(cluster):
    """A survivor prefetching an earlier incarnation's memory reads on after its peers adopted the next
    plan; a stranger, or a plan the keeper forgot, is refused."""
    c = cluster(nodes=3, per_node=1, k=2, m=1)
    c.snapshot(1)  # protected: the plan is kept when the next one comes
    keeper = c.protectors["node1"]
    keeper.protect(replace(c.plan, token="bbbb", created=2.0, secret="n3xt"))

    def answers(secret: str) -> bool:
        try:
            client = PeerClient(keeper.address, secret=secret)
        except PeerError:
            return False
        try:
            client.request("inventory")
            return True
        finally:
            client.close()

    assert answers("n3xt") and answers(c.plan.secret) and not answers("stranger")
    keeper.protect(replace(c.plan, token="cccc", created=3.0, secret="l4st"))  # "bbbb" never protected a step
    assert answers("l4st") and answers(c.plan.secret) and not answers("n3xt")


def test_pace_spaces_sends_to_the_rate():
    pace = Pace()
    start = time.monotonic()
    for _ in range(4):
        pace.wait(50_000, bytes_per_s=1e6)  # 0.05 s each: the first goes at once, the rest wait their turn
    assert 0.15 <= time.monotonic() - start < 2.0
    unlimited = Pace()
    start = time.monotonic()
    for _ in range(1000):
        unlimited.wait(10**9, bytes_per_s=0)
    assert time.monotonic() - start < 0.5


def test_the_nodes_of_a_group_code_the_steps_its_first_node_takes(cluster):
    c = cluster(nodes=3, per_node=1, k=2, m=1)
    c.snapshot(1)

    def held(node, step):
        for r in c.ranks[node]:
            c.slots[node][(r, step)] = rank_slot(r, c.world, step)
        return {r: (*c.slots[node][(r, step)], {"train": {"step": step, "rank": r}}) for r in c.ranks[node]}

    follower = c.protectors["node1"]
    assert not follower.submit(2, held("node1", 2), lambda: None)  # node0 has not taken step 2
    assert c.protectors["node0"].submit(2, held("node0", 2), lambda: None)
    deadline = time.monotonic() + 30
    for node in ("node1", "node2"):  # as soon as node0's meta announced it
        while not c.protectors[node].submit(2, held(node, 2), lambda: None):
            assert time.monotonic() < deadline, "the followers never took the leader's step"
            time.sleep(0.01)
    while any(p.protected_step() < 2 for p in c.protectors.values()):
        assert time.monotonic() < deadline, "parity never completed"
        time.sleep(0.01)


@pytest.mark.parametrize("m", [2, 3])
def test_shares_scaled_by_the_workers_make_the_parity_the_holders_would(cluster, m):
    """fault.erasure.encode=device: the workers hand over rows 1..m-1 of their shares scaled, and the
    holders only add them; the parity is the same bytes, and lost nodes come back from it."""
    host = cluster(nodes=m + 2, per_node=2, k=2, m=m)
    device = cluster(nodes=m + 2, per_node=2, k=2, m=m, site="device")
    assert host.protectors["node0"].share_recipe(0, {0: 64, 1: 64}) is None
    recipe = device.protectors["node0"].share_recipe(0, {0: 1000, 1: 600})
    assert recipe.rows == m - 1 and [r[:2] for r in recipe.ranges] == [(0, 800), (800, 1000)]  # segments of 800 bytes
    host.snapshot(1)
    device.snapshot(1)
    for node in host.names:
        parity = {key: buf.data for key, buf in host.protectors[node]._parity.items()}
        scaled = {key: buf.data for key, buf in device.protectors[node]._parity.items()}
        assert parity.keys() == scaled.keys()
        for key in parity:
            np.testing.assert_array_equal(parity[key], scaled[key], err_msg=f"{node} {key}")
    device.lose(*device.names[1 : m + 1])
    assert_restores(device, step=1, new_world=4)


def test_shares_scaled_for_another_incarnation_are_not_used(cluster):
    c = cluster(nodes=4, per_node=1, k=2, m=2, site="device")
    c.snapshot(1, shares_token="zzzz")  # as if scaled under the previous plan: the holders scale instead
    c.lose("node0", "node2")
    assert_restores(c, step=1, new_world=2)


def test_a_byte_flipped_on_the_wire_or_in_parity_memory_is_caught_before_any_target_takes_it(cluster, monkeypatch):
    """Every piece a restore reads is checked against the checksums its worker computed: a held
    rank fetched from a peer whose bytes a faulty link flips, and a lost rank decoded from parity
    flipped in its holder's memory, both fail with the rank and tensor named."""
    c = cluster(nodes=3, per_node=2, k=2, m=1)
    c.snapshot(1)
    c.lose("node1")
    serve = ParityService._fetch

    def flipping(self, header):
        data = np.array(serve(self, header))
        if header["kind"] == "slot":
            data[data.size // 2] ^= 0x10
        return data

    monkeypatch.setattr(ParityService, "_fetch", flipping)
    with pytest.raises(
        checksum.ChecksumMismatch, match=r"old rank \d's snapshot of step 1 \(held by node\d\), model/w"
    ):
        assert_restores(c, step=1, new_world=2)
    monkeypatch.setattr(ParityService, "_fetch", serve)
    for buf in c.protectors["node2"]._parity.values():  # parity of node1's segment lives on node2
        buf.data[0] ^= 0x01
    with pytest.raises(checksum.ChecksumMismatch, match="decoded for lost node1"):
        assert_restores(c, step=1, new_world=2)


def test_pieces_follow_tensors_and_cover_any_span(monkeypatch):
    monkeypatch.setattr(checksum, "PIECE_BYTES", 64)
    monkeypatch.setattr(checksum, "_PIECES", {})
    layout, slot = rank_slot(0, 1, 1)  # model/w: 13 x 7 float32 = 364 bytes, then model/b and optim/step
    w = next(e for e in layout.entries if e.name == "model/w")
    pieces = checksum.pieces(layout)
    assert [(a - w.offset, n) for a, n, name in pieces if name == "model/w"] == [
        (0, 64),
        (64, 64),
        (128, 64),
        (192, 64),
        (256, 64),
        (320, 44),
    ]
    start, stop, indices = checksum.covering(layout, w.offset + 70, 100)
    assert (start - w.offset, stop - w.offset, indices) == (64, 192, [1, 2])
    sums = checksum.checksums(slot, layout)
    checksum.verify(slot, layout, sums, what="rank 0")
    slot[w.offset + 300] ^= 1
    with pytest.raises(checksum.ChecksumMismatch, match="rank 0: checksum mismatch in model/w"):
        checksum.verify(slot, layout, sums, what="rank 0")
