"""Routes of micro-batches through pipeline stages, and the per-stage plans that run them.

CheckFree+ trains each edge stage to stand in for its neighbour by running the first two and the
last two body stages in swapped order on odd micro-batches. Here a swap is a change of route: the
activation travels to the rank that holds the stage, so no weights move. The embedding runs first
and the head (norm, output projection, loss) last on every micro-batch, so the stage that can come
first holds a copy of the embedding and the one that can come last a copy of the head.

Rules for small pipelines, where the two swapped pairs are not disjoint:
- 2 stages: the one pair is both the first and the last pair; odd micro-batches run it swapped
  once, (1, 0). Both stages hold the embedding and the head.
- 3 stages: the pairs (0, 1) and (1, 2) overlap, so they take turns: micro-batches 1 mod 4 swap the
  first pair (1, 0, 2), micro-batches 3 mod 4 the last pair (0, 2, 1). Stage 1 holds both copies,
  and a step needs at least 4 micro-batches so that both swaps happen in every step.

Everything here is pure Python (no process groups), so routes and plans are checked without ranks.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

ROUTES = ("identity", "checkfree_plus")
PLANS = ("GPipe", "1F1B")

Route = tuple[int, ...]


# ---- routes ---------------------------------------------------------------------------------


def check_route(*, mode: str, n_stages: int, n_microbatches: int) -> None:
    """Refuse a route mode the pipeline cannot run, saying what to change."""
    if mode not in ROUTES:
        raise ValueError(f"route {mode!r}: choose one of {ROUTES}")
    if n_stages < 1 or n_microbatches < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got {n_stages} and {n_microbatches}")
    if mode == "identity":
        return
    if n_stages < 2:
        raise ValueError("route 'checkfree_plus' swaps pipeline stages: it needs parallel.pp >= 2")
    if n_microbatches < 2:
        raise ValueError("route 'checkfree_plus' swaps odd micro-batches: it needs parallel.microbatches >= 2")
    if n_stages == 3 and n_microbatches < 4:
        raise ValueError(
            "route 'checkfree_plus' with 3 stages swaps the first pair on micro-batches 1 mod 4 and the last pair "
            f"on micro-batches 3 mod 4: it needs parallel.microbatches >= 4, got {n_microbatches}"
        )


def route_of(microbatch: int, *, mode: str, n_stages: int) -> Route:
    """Body-stage ids in the order micro-batch `microbatch` applies them."""
    identity = tuple(range(n_stages))
    if mode not in ROUTES:
        raise ValueError(f"route {mode!r}: choose one of {ROUTES}")
    if mode == "identity" or microbatch % 2 == 0:
        return identity
    if n_stages < 2:
        raise ValueError("route 'checkfree_plus' needs at least 2 stages")
    if n_stages == 2:
        return (1, 0)
    if n_stages == 3:
        return (1, 0, 2) if microbatch % 4 == 1 else (0, 2, 1)
    return (1, 0, *range(2, n_stages - 2), n_stages - 1, n_stages - 2)


def routes_for(*, mode: str, n_stages: int, n_microbatches: int) -> list[Route]:
    """The route of every micro-batch of a step, checked."""
    check_route(mode=mode, n_stages=n_stages, n_microbatches=n_microbatches)
    routes = [route_of(m, mode=mode, n_stages=n_stages) for m in range(n_microbatches)]
    validate_routes(routes, n_stages=n_stages)
    return routes


def embedding_holders(n_stages: int, *, copies: bool) -> tuple[int, ...]:
    """Stages holding the embedding: stage 0, and with copies also stage 1 (its stand-in)."""
    return (0, 1) if copies and n_stages > 1 else (0,)


def head_holders(n_stages: int, *, copies: bool) -> tuple[int, ...]:
    """Stages holding norm + output projection: the last stage, and with copies also the one before it."""
    return (n_stages - 2, n_stages - 1) if copies and n_stages > 1 else (n_stages - 1,)


def swap_partner(stage: int, *, n_stages: int) -> int | None:
    """The stage an edge stage is trained to stand in for (a lost edge stage is rebuilt from it)."""
    if n_stages < 2 or not 0 <= stage < n_stages:
        return None
    if stage in (0, 1):
        return 1 - stage
    if stage in (n_stages - 2, n_stages - 1):
        return 2 * n_stages - 3 - stage
    return None


@dataclass(frozen=True)
class Position:
    """Where one stage sits in one micro-batch's route: its neighbours, or None at an end."""

    previous: int | None
    next: int | None

    @property
    def is_first(self) -> bool:
        return self.previous is None

    @property
    def is_last(self) -> bool:
        return self.next is None


def position_in(route: Route, stage: int) -> Position:
    index = route.index(stage)
    return Position(
        previous=route[index - 1] if index > 0 else None, next=route[index + 1] if index + 1 < len(route) else None
    )


def validate_routes(routes: Sequence[Route], *, n_stages: int, stage_to_rank: Sequence[int] | None = None) -> None:
    """Every route visits every stage once; route neighbours live on different ranks."""
    if not routes:
        raise ValueError("no micro-batches: a step needs at least one route")
    ranks = list(stage_to_rank) if stage_to_rank is not None else list(range(n_stages))
    for microbatch, route in enumerate(routes):
        if sorted(route) != list(range(n_stages)):
            raise ValueError(f"micro-batch {microbatch}: route {route} must visit each of the {n_stages} stages once")
        for a, b in zip(route, route[1:]):
            if ranks[a] == ranks[b]:
                raise ValueError(
                    f"micro-batch {microbatch}: stages {a} and {b} follow each other on route {route} but share "
                    f"rank {ranks[a]}; place route neighbours on different ranks"
                )


# ---- plans ------------------------------------------------------------------------------------


class Op(NamedTuple):
    """One entry of a stage's plan: compute (F, B) or the transfer of one micro-batch's tensor."""

    kind: str  # F | B | SEND_F | RECV_F | SEND_B | RECV_B
    stage: int
    microbatch: int


# Relative costs for ordering only: a backward costs about two forwards.
_COST = {"F": 1, "B": 2}


def build_plan(routes: Sequence[Route], *, plan: str, extra_in_flight: int = 0) -> dict[int, list[Op]]:
    """Each stage's ordered ops for one step, with the sends and receives the routes imply.

    The compute order comes from a greedy list schedule on unit costs: a stage runs the ready op its
    plan prefers (GPipe: every forward, then the backwards; 1F1B: a ready backward first, else a
    forward while fewer than its warm-up count are in flight). Ready means the route predecessor's
    forward (or successor's backward) has finished, so a stage may take micro-batch 3 before 2. If the
    in-flight caps ever stall every stage, the lowest stalled forward goes over its cap. Transfers are
    inserted where the simulated sender finishes, which keeps each (sender, receiver) channel in the
    same order on both ends, as tag-less point-to-point matching needs.
    """
    if plan not in PLANS:
        raise ValueError(f"plan {plan!r}: choose one of {PLANS}")
    if extra_in_flight < 0:
        raise ValueError(f"extra_in_flight={extra_in_flight} must be >= 0")
    n_stages = len(routes[0])
    validate_routes(routes, n_stages=n_stages)
    timeline = _simulate(routes, plan=plan, extra_in_flight=extra_in_flight)
    return _with_transfers(timeline, routes)


def in_flight_caps(routes: Sequence[Route], *, extra_in_flight: int = 0) -> list[int]:
    """1F1B warm-up per stage: n_stages minus its earliest position on any route (as torch's 1F1B), plus extra."""
    n_stages, n_mb = len(routes[0]), len(routes)
    earliest = [min(route.index(s) for route in routes) for s in range(n_stages)]
    return [min(n_mb, n_stages - earliest[s] + extra_in_flight) for s in range(n_stages)]


class _Run(NamedTuple):
    start: int
    end: int
    op: Op


def _simulate(routes: Sequence[Route], *, plan: str, extra_in_flight: int) -> list[_Run]:
    n_stages, n_mb = len(routes[0]), len(routes)
    where = [[position_in(route, s) for s in range(n_stages)] for route in routes]
    caps = in_flight_caps(routes, extra_in_flight=extra_in_flight)
    f_end: dict[tuple[int, int], int] = {}
    b_end: dict[tuple[int, int], int] = {}
    todo_f = [set(range(n_mb)) for _ in range(n_stages)]
    todo_b = [set(range(n_mb)) for _ in range(n_stages)]
    in_flight = [0] * n_stages
    free_at = [0] * n_stages
    runs: list[_Run] = []

    def ready_f(s: int, t: int) -> list[int]:
        return sorted(m for m in todo_f[s] if where[m][s].is_first or f_end.get((where[m][s].previous, m), t + 1) <= t)

    def ready_b(s: int, t: int) -> list[int]:
        return sorted(
            m
            for m in todo_b[s]
            if f_end.get((s, m), t + 1) <= t and (where[m][s].is_last or b_end.get((where[m][s].next, m), t + 1) <= t)
        )

    def choose(s: int, t: int) -> Op | None:
        if plan == "GPipe":
            if todo_f[s]:
                ready = ready_f(s, t)
                return Op("F", s, ready[0]) if ready else None
            ready = ready_b(s, t)
            return Op("B", s, ready[0]) if ready else None
        ready = ready_b(s, t)
        if ready:
            return Op("B", s, ready[0])
        ready = ready_f(s, t) if in_flight[s] < caps[s] else []
        return Op("F", s, ready[0]) if ready else None

    def start(op: Op, t: int) -> None:
        end = t + _COST[op.kind]
        s, m = op.stage, op.microbatch
        if op.kind == "F":
            todo_f[s].discard(m)
            in_flight[s] += 1
            f_end[(s, m)] = end
        else:
            todo_b[s].discard(m)
            in_flight[s] -= 1
            b_end[(s, m)] = end
        free_at[s] = end
        runs.append(_Run(t, end, op))

    t = 0
    while any(todo_f) or any(todo_b):
        started = False
        for s in range(n_stages):
            if free_at[s] <= t and (op := choose(s, t)) is not None:
                start(op, t)
                started = True
        later = [f for f in free_at if f > t]
        if later:
            t = min(later)
        elif not started:
            start(_over_cap(ready_f, n_stages, t), t)
    return runs


def _over_cap(ready_f, n_stages: int, t: int) -> Op:
    """The lowest-numbered ready forward of any stage, run beyond its in-flight cap to break a stall."""
    candidates = [(ready[0], s) for s in range(n_stages) if (ready := ready_f(s, t))]
    assert candidates, "a stalled plan always has a ready forward"
    m, s = min(candidates)
    return Op("F", s, m)


def _with_transfers(runs: list[_Run], routes: Sequence[Route]) -> dict[int, list[Op]]:
    n_stages = len(routes[0])
    plan: dict[int, list[Op]] = {s: [] for s in range(n_stages)}
    # At equal times a finish (and its sends) comes before a start, so a receive precedes its consumer.
    events = [(run.end, 0, run.op.stage, run.op) for run in runs] + [
        (run.start, 1, run.op.stage, run.op) for run in runs
    ]
    heapq.heapify(events)
    while events:
        _, phase, s, op = heapq.heappop(events)
        if phase == 1:
            plan[s].append(op)
            continue
        where = position_in(routes[op.microbatch], s)
        if op.kind == "F" and where.next is not None:
            plan[s].append(Op("SEND_F", s, op.microbatch))
            plan[where.next].append(Op("RECV_F", where.next, op.microbatch))
        elif op.kind == "B" and where.previous is not None:
            plan[s].append(Op("SEND_B", s, op.microbatch))
            plan[where.previous].append(Op("RECV_B", where.previous, op.microbatch))
    return plan


def check_plan(plan: dict[int, list[Op]], routes: Sequence[Route]) -> None:
    """Run a plan as the runtime does (sends and receives post without blocking; a compute waits for
    its input's send) and raise ValueError if it computes something twice or never, consumes an
    input it never received, crosses the order of a channel, or stalls."""
    n_stages = len(routes[0])
    _check_ops(plan, routes)
    sends: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    pending: dict[tuple[str, int, int], tuple[tuple[int, int], int]] = {}  # consumer -> (channel, index)
    cursor = [0] * n_stages
    while any(cursor[s] < len(plan[s]) for s in range(n_stages)):
        moved = False
        for s in range(n_stages):
            while cursor[s] < len(plan[s]):
                op = plan[s][cursor[s]]
                if not _step(op, routes, sends, recvs, pending):
                    break
                cursor[s] += 1
                moved = True
        if not moved:
            stuck = {s: plan[s][cursor[s]] for s in range(n_stages) if cursor[s] < len(plan[s])}
            raise ValueError(f"plan stalls: every unfinished stage waits on input never sent: {stuck}")
    for channel in set(sends) | set(recvs):
        if sends[channel] != recvs[channel]:
            raise ValueError(f"channel {channel}: sends {sends[channel]} and receives {recvs[channel]} differ in order")


def _check_ops(plan: dict[int, list[Op]], routes: Sequence[Route]) -> None:
    n_stages, n_mb = len(routes[0]), len(routes)
    for s in range(n_stages):
        ops = plan.get(s, [])
        if any(op.stage != s for op in ops):
            raise ValueError(f"stage {s}'s plan holds ops of other stages")
        for kind in ("F", "B"):
            done = sorted(op.microbatch for op in ops if op.kind == kind)
            if done != list(range(n_mb)):
                raise ValueError(f"stage {s} runs {kind} on micro-batches {done}, expected each of 0..{n_mb - 1} once")
        seen: set[tuple[str, int]] = set()
        for op in ops:
            where = position_in(routes[op.microbatch], s)
            needs = {
                "F": "RECV_F" if not where.is_first else None,
                "B": "RECV_B" if not where.is_last else None,
                "SEND_F": "F",
                "SEND_B": "B",
            }.get(op.kind)
            if needs is not None and (needs, op.microbatch) not in seen:
                raise ValueError(f"stage {s}: {op} comes before its {needs}")
            if op.kind in ("SEND_F", "RECV_B") and where.is_last or op.kind in ("SEND_B", "RECV_F") and where.is_first:
                raise ValueError(f"stage {s}: {op} has no peer on route {routes[op.microbatch]}")
            seen.add((op.kind, op.microbatch))


def _step(op: Op, routes, sends, recvs, pending) -> bool:
    """Advance past `op` if the runtime could; False if it would wait."""
    where = position_in(routes[op.microbatch], op.stage)
    if op.kind == "SEND_F":
        sends[(op.stage, where.next)].append(("F", op.microbatch))
    elif op.kind == "SEND_B":
        sends[(op.stage, where.previous)].append(("B", op.microbatch))
    elif op.kind in ("RECV_F", "RECV_B"):
        channel = (where.previous, op.stage) if op.kind == "RECV_F" else (where.next, op.stage)
        recvs[channel].append((op.kind[-1], op.microbatch))
        pending[(op.kind[-1], op.stage, op.microbatch)] = (channel, len(recvs[channel]))
    else:
        key = (op.kind, op.stage, op.microbatch)
        if key in pending:
            channel, index = pending[key]
            if len(sends[channel]) < index:
                return False
            del pending[key]
    return True
