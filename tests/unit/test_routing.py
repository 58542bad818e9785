"""Routed pipelines (CheckFree+): routes and plans as pure data, then the runtime on gloo ranks.

The multi-process tests compare a float64 model cut into stages against one process that applies
the same per-micro-batch stage orders: gradients and losses agree to 1e-12, a reference that
ignores the swaps does not (so the swaps really happen), and the identity route agrees with torch's
stock schedules. Each run has a deadline and fails with a message instead of hanging.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_ckpt_workers import WORLD, workers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from resurgo.parallel.fsdp import apply_fsdp
from resurgo.parallel.pipeline import cut_stage, stage_layers
from resurgo.parallel.routed import RoutedSchedule, build_routed_schedule
from resurgo.parallel.routed_stage import RoutedStage, cut_routed_stage
from resurgo.parallel.routing import (
    PLANS,
    ROUTES,
    Op,
    build_plan,
    check_plan,
    check_route,
    embedding_holders,
    head_holders,
    in_flight_caps,
    position_in,
    route_of,
    routes_for,
    swap_partner,
    validate_routes,
)
from resurgo.trainer.config import ModelConfig
from resurgo.trainer.model import Transformer

# ---- routes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 5, 8])
def test_checkfree_plus_swaps_the_edge_pairs_on_odd_microbatches(n):
    identity = tuple(range(n))
    assert route_of(0, mode="checkfree_plus", n_stages=n) == identity
    assert route_of(2, mode="checkfree_plus", n_stages=n) == identity
    odd = route_of(3, mode="checkfree_plus", n_stages=n)
    assert odd == (1, 0, *range(2, n - 2), n - 1, n - 2)
    assert all(route_of(m, mode="identity", n_stages=n) == identity for m in range(5))
    assert embedding_holders(n, copies=True) == (0, 1) and head_holders(n, copies=True) == (n - 2, n - 1)
    assert embedding_holders(n, copies=False) == (0,) and head_holders(n, copies=False) == (n - 1,)
    assert [swap_partner(s, n_stages=n) for s in (0, 1, n - 2, n - 1)] == [1, 0, n - 1, n - 2]
    assert swap_partner(2, n_stages=n) is (None if n > 4 else 3)


def test_three_stages_take_turns_swapping_the_overlapping_pairs():
    """Pairs (0, 1) and (1, 2) share stage 1: 1 mod 4 swaps the first, 3 mod 4 the last."""
    routes = routes_for(mode="checkfree_plus", n_stages=3, n_microbatches=8)
    assert routes == [(0, 1, 2), (1, 0, 2), (0, 1, 2), (0, 2, 1)] * 2
    assert {r[0] for r in routes} == set(embedding_holders(3, copies=True)) == {0, 1}
    assert {r[-1] for r in routes} == set(head_holders(3, copies=True)) == {1, 2}
    with pytest.raises(ValueError, match="microbatches >= 4"):
        check_route(mode="checkfree_plus", n_stages=3, n_microbatches=3)


def test_two_stages_swap_their_one_pair_once():
    routes = routes_for(mode="checkfree_plus", n_stages=2, n_microbatches=4)
    assert routes == [(0, 1), (1, 0), (0, 1), (1, 0)]
    assert embedding_holders(2, copies=True) == head_holders(2, copies=True) == (0, 1)
    assert position_in((1, 0), 0).is_last and position_in((1, 0), 1).is_first


def test_route_errors_say_what_to_change():
    with pytest.raises(ValueError, match="choose one of"):
        check_route(mode="swap", n_stages=4, n_microbatches=4)
    with pytest.raises(ValueError, match="pp >= 2"):
        check_route(mode="checkfree_plus", n_stages=1, n_microbatches=4)
    with pytest.raises(ValueError, match="microbatches >= 2"):
        check_route(mode="checkfree_plus", n_stages=4, n_microbatches=1)
    with pytest.raises(ValueError, match="visit each"):
        validate_routes([(0, 1, 1)], n_stages=3)
    with pytest.raises(ValueError, match="share rank 0"):
        validate_routes([(1, 0, 2)], n_stages=3, stage_to_rank=[0, 0, 1])
    with pytest.raises(ValueError, match="choose one of"):
        build_plan([(0, 1)], plan="Interleaved1F1B")


# ---- plans ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("mode", ROUTES)
def test_plans_run_without_stalls_and_keep_channel_order(plan, mode):
    for n in range(2, 9):
        for m in range(max(n, 4), 3 * n + 1):
            for extra in (0, 2):
                routes = routes_for(mode=mode, n_stages=n, n_microbatches=m)
                check_plan(build_plan(routes, plan=plan, extra_in_flight=extra), routes)


def test_identity_plans_match_torch_orders():
    """On the identity route every stage runs its backwards in micro-batch order (as GPipe and 1F1B do),
    and 1F1B never holds more than n_stages - stage forwards in flight."""
    n, m = 4, 8
    routes = routes_for(mode="identity", n_stages=n, n_microbatches=m)
    for plan in PLANS:
        ops = build_plan(routes, plan=plan)
        for s in range(n):
            assert [op.microbatch for op in ops[s] if op.kind == "B"] == list(range(m))
    ops = build_plan(routes, plan="1F1B")
    assert in_flight_caps(routes) == [4, 3, 2, 1]
    for s in range(n):
        live = peak = 0
        for op in ops[s]:
            live += {"F": 1, "B": -1}.get(op.kind, 0)
            peak = max(peak, live)
        assert peak == n - s


def test_check_plan_catches_crossed_channels_and_stalls():
    routes = routes_for(mode="checkfree_plus", n_stages=4, n_microbatches=4)
    plan = build_plan(routes, plan="GPipe")
    crossed = {s: list(ops) for s, ops in plan.items()}
    crossed[1].remove(Op("SEND_F", 1, 0))
    crossed[1].insert(crossed[1].index(Op("SEND_F", 1, 2)) + 1, Op("SEND_F", 1, 0))
    with pytest.raises(ValueError, match="differ in order"):
        check_plan(crossed, routes)
    late = {s: list(ops) for s, ops in plan.items()}
    late[1].remove(Op("RECV_F", 1, 0))
    late[1].append(Op("RECV_F", 1, 0))
    with pytest.raises(ValueError, match="comes before its RECV_F"):
        check_plan(late, routes)
    stalled = {s: list(ops) for s, ops in plan.items()}
    send = stalled[0].index(Op("SEND_F", 0, 0))
    stalled[0].insert(len(stalled[0]) - 1, stalled[0].pop(send))  # after stage 0 waits for gradients of 0
    with pytest.raises(ValueError, match="stalls"):
        check_plan(stalled, routes)


# ---- the runtime on gloo ranks ----------------------------------------------------------------------------

SEED, VOCAB, SEQ, MB_ROWS = 7, 32, 8, 2
DEADLINE_S = 120


def _cfg() -> ModelConfig:
    return ModelConfig(dim=16, n_layers=4, n_heads=2, n_kv_heads=1, vocab_size=VOCAB, max_seq_len=SEQ, ffn_hidden=24)


def _model() -> Transformer:
    model = Transformer(_cfg()).to(torch.float64)
    model.init_weights(seed=SEED)
    return model


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _batches(n_steps: int, n_mb: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [
        (
            torch.randint(VOCAB, (n_mb * MB_ROWS, SEQ), generator=g),
            torch.randint(VOCAB, (n_mb * MB_ROWS, SEQ), generator=g),
        )
        for _ in range(n_steps)
    ]


def _grads(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: p.grad.detach().numpy().copy() for name, p in module.named_parameters() if p.grad is not None}


def _pp_group(n_stages: int):
    """Every rank creates the group (a collective); ranks outside it get None and sit this run out."""
    group = dist.new_group(list(range(n_stages)))
    return group if dist.get_rank() < n_stages else None


def routed_task(n_stages: int, mode: str, plan: str, n_mb: int, n_steps: int, evaluate: bool) -> dict | None:
    """Train `n_steps` batches (gradients accumulate) on a routed pipeline; optionally an eval pass in between."""
    group = _pp_group(n_stages)
    if group is None:
        return None
    rank = dist.get_rank()
    module = cut_routed_stage(_model(), stage_id=rank, n_stages=n_stages, copies=mode != "identity")
    stage = RoutedStage(module, rank, n_stages, torch.device("cpu"), group=group)
    schedule = RoutedSchedule(
        stage, n_microbatches=n_mb, loss_fn=_loss, plan=plan, route=mode, wait_timeout=timedelta(seconds=60)
    )
    out: dict = {
        "losses": [],
        "eval_losses": [],
        "copies": [n for n, p in module.named_parameters() if any(p is c for c in schedule.copy_parameters())],
    }
    for index, (x, y) in enumerate(_batches(n_steps, n_mb)):
        args = (x,) if schedule.needs_inputs else ()
        target = y if schedule.needs_target else None
        losses: list[torch.Tensor] = []
        schedule.step(*args, target=target, losses=losses)
        out["losses"].append([v.item() for v in losses])
        if evaluate and index == 0:
            with torch.no_grad():
                schedule.eval(*args, target=target, losses=(evaluated := []))
            out["eval_losses"] = [v.item() for v in evaluated]
    out["grads"] = _grads(module)
    return out


def stock_task(n_stages: int, plan: str, n_mb: int) -> dict | None:
    """The identity route next to torch's stock schedule, on the same batch."""
    group = _pp_group(n_stages)
    if group is None:
        return None
    rank = dist.get_rank()
    ((x, y),) = _batches(1, n_mb)
    out = {}
    for name in ("stock", "routed"):
        module = cut_stage(_model(), stage_id=rank, n_stages=n_stages)
        if name == "stock":
            cls = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}[plan]
            schedule = cls(PipelineStage(module, rank, n_stages, torch.device("cpu"), group=group), n_mb, loss_fn=_loss)
        else:
            stage = RoutedStage(module, rank, n_stages, torch.device("cpu"), group=group)
            schedule = RoutedSchedule(stage, n_microbatches=n_mb, loss_fn=_loss, plan=plan)
        losses: list[torch.Tensor] = []
        schedule.step(*((x,) if rank == 0 else ()), target=y if rank == n_stages - 1 else None, losses=losses)
        out[name] = {"losses": [v.item() for v in losses], "grads": _grads(module)}
    return out


def _reference(n_stages: int, routes: list[tuple[int, ...]], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """One process applying each micro-batch's stage order; losses scaled as the schedules scale gradients."""
    model, n_mb = _model(), len(routes)
    layers = stage_layers(_cfg().n_layers, n_stages)
    losses = []
    for x, y in batches:
        step_losses = []
        for route, xm, ym in zip(routes, x.chunk(n_mb), y.chunk(n_mb)):
            h = model.tok_embeddings(xm)
            for stage in route:
                for i in layers[stage]:
                    h = model.layers[str(i)](h, model.rope)
            loss = _loss(model.output(model.norm(h)).float(), ym)
            (loss / n_mb).backward()
            step_losses.append(loss.item())
        losses.append(step_losses)
    return {"losses": losses, "grads": _grads(model)}


def _max_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert got.keys() <= want.keys(), sorted(got.keys() - want.keys())
    return max(float(np.abs(got[k] - want[k]).max()) for k in got)


def _check_against_references(results: list, *, n_stages: int, mode: str, n_mb: int, n_steps: int) -> None:
    routes = routes_for(mode=mode, n_stages=n_stages, n_microbatches=n_mb)
    batches = _batches(n_steps, n_mb)
    same = _reference(n_stages, routes, batches)
    ignoring_swaps = _reference(n_stages, routes_for(mode="identity", n_stages=n_stages, n_microbatches=n_mb), batches)
    ranks = results[:n_stages]
    for rank, got in enumerate(ranks):
        assert _max_diff(got["grads"], same["grads"]) <= 1e-12, f"rank {rank}"
    losses = ranks[-1]["losses"]
    assert np.abs(np.array(losses) - np.array(same["losses"])).max() <= 1e-12
    assert all(r["losses"] == [[]] * n_steps for r in ranks[:-1]), "only the last stage's rank reports losses"
    if mode != "identity":
        body = {k: v for r in ranks for k, v in r["grads"].items() if k.startswith("layers.")}
        assert _max_diff(body, ignoring_swaps["grads"]) > 1e-6, "the swaps changed nothing"
        # The copies end every step bitwise equal to their originals.
        for name in ("tok_embeddings.weight", "norm.weight", "output.weight"):
            holders = [r["grads"][name] for r in ranks if name in r["grads"]]
            assert len(holders) == 2 and np.array_equal(holders[0], holders[1]), name


def _run(fn, *args):
    return workers().run(fn, *args, timeout=DEADLINE_S)


@pytest.mark.parametrize(("plan", "n_mb"), [("GPipe", 4), ("1F1B", 8)])
def test_checkfree_plus_matches_a_reference_applying_the_same_orders(plan, n_mb):
    results = _run(routed_task, WORLD, "checkfree_plus", plan, n_mb, 1, False)
    _check_against_references(results, n_stages=WORLD, mode="checkfree_plus", n_mb=n_mb, n_steps=1)
    assert results[1]["copies"] == ["tok_embeddings.weight"]
    assert results[2]["copies"] == ["norm.weight", "output.weight"]
    assert results[0]["copies"] == results[3]["copies"] == []


@pytest.mark.parametrize("plan", PLANS)
def test_identity_route_equals_torchs_stock_schedule(plan):
    results = _run(stock_task, WORLD, plan, 8)
    for rank, result in enumerate(results):
        assert _max_diff(result["routed"]["grads"], result["stock"]["grads"]) <= 1e-12, f"rank {rank}"
        assert result["routed"]["losses"] == pytest.approx(result["stock"]["losses"], abs=1e-12)
    assert len(results[-1]["routed"]["losses"]) == 8


def test_accumulation_eval_and_mode_switch():
    """Two steps accumulate (the copies' exchange adds only what each step added), and an eval pass
    between them runs the identity route and leaves training unchanged."""
    results = _run(routed_task, WORLD, "checkfree_plus", "1F1B", 4, 2, True)
    _check_against_references(results, n_stages=WORLD, mode="checkfree_plus", n_mb=4, n_steps=2)
    model = _model()
    with torch.no_grad():
        x, y = _batches(1, 4)[0]
        want = [_loss(model(xm), ym).item() for xm, ym in zip(x.chunk(4), y.chunk(4))]
    assert results[-1]["eval_losses"] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(("n_stages", "plan", "n_mb"), [(3, "1F1B", 8), (2, "GPipe", 4)])
def test_small_pipelines(n_stages, plan, n_mb):
    results = _run(routed_task, n_stages, "checkfree_plus", plan, n_mb, 1, False)
    assert all(r is None for r in results[n_stages:])
    _check_against_references(results, n_stages=n_stages, mode="checkfree_plus", n_mb=n_mb, n_steps=1)


def fsdp_task(mode: str, plan: str, n_mb: int) -> dict:
    """pp=2 x dp_shard=2: FSDP2-sharded stages (DTensor parameters and gradients) on a routed pipeline."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp_shard"))
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp_shard"].get_local_rank()
    module = cut_routed_stage(_model(), stage_id=pp_rank, n_stages=2, copies=mode != "identity")
    apply_fsdp(module, mesh["dp_shard"], policy=MixedPrecisionPolicy(), reshard_after_forward=False)
    schedule = build_routed_schedule(
        [module],
        stage_ids=[pp_rank],
        n_stages=2,
        pp_mesh=mesh["pp"],
        device=torch.device("cpu"),
        schedule=plan,
        microbatches=n_mb,
        loss_fn=_loss,
        route=mode,
    )
    ((x, y),) = _batches(1, 2 * n_mb)
    rows = slice(dp_rank * n_mb * MB_ROWS, (dp_rank + 1) * n_mb * MB_ROWS)
    losses: list[torch.Tensor] = []
    schedule.step(
        *((x[rows],) if schedule.needs_inputs else ()), target=y[rows] if schedule.needs_target else None, losses=losses
    )
    grads = {name: p.grad.full_tensor().detach().numpy().copy() for name, p in module.named_parameters()}
    return {"losses": [[v.item() for v in losses]], "grads": grads, "dp_rank": dp_rank, "pp_rank": pp_rank}


def test_fsdp_sharded_stages():
    """Stages sharded by FSDP2 over a second mesh axis: DTensor gradients, the copies' exchange on
    local shards, FSDP's reduction; gradients are the data-parallel mean of the reference."""
    n_mb = 4
    results = _run(fsdp_task, "checkfree_plus", "1F1B", n_mb)
    routes = routes_for(mode="checkfree_plus", n_stages=2, n_microbatches=n_mb)
    ((x, y),) = _batches(1, 2 * n_mb)
    half = n_mb * MB_ROWS
    shards = [(x[:half], y[:half]), (x[half:], y[half:])]
    want = _reference(2, routes, shards)
    mean = {k: v / 2 for k, v in want["grads"].items()}
    for result in results:
        assert _max_diff(result["grads"], mean) <= 1e-12, (result["pp_rank"], result["dp_rank"])
        expected = [want["losses"][result["dp_rank"]]] if result["pp_rank"] == 1 else [[]]
        assert np.abs(np.array(result["losses"]) - np.array(expected)).max(initial=0) <= 1e-12


def refusals_task() -> dict:
    """Misconfigurations are refused with what to do; a rank that fails mid-step makes its peers fail by
    the deadline instead of waiting for ever."""
    group, rank, n = _pp_group(WORLD), dist.get_rank(), WORLD
    cpu = torch.device("cpu")
    messages = {}
    for name, copies, cut_copies in (("no_copies", False, True), ("not_cut", True, False)):
        stage = RoutedStage(
            cut_routed_stage(_model(), stage_id=rank, n_stages=n, copies=cut_copies), rank, n, cpu, group=group
        )
        try:
            RoutedSchedule(stage, n_microbatches=4, loss_fn=_loss, route="checkfree_plus", copies=copies)
        except ValueError as err:
            messages[name] = str(err)
    module = cut_routed_stage(_model(), stage_id=rank, n_stages=n, copies=True)
    schedule = RoutedSchedule(
        RoutedStage(module, rank, n, cpu, group=group),
        n_microbatches=4,
        loss_fn=_loss,
        plan="GPipe",
        route="checkfree_plus",
        wait_timeout=timedelta(seconds=3),
    )
    ((x, y),) = _batches(1, 4)
    args = (x,) if rank == 0 else ()  # stage 1 holds the embedding's copy but gets no inputs
    try:
        schedule.step(*args, target=y if schedule.needs_target else None, losses=[])
    except (ValueError, TimeoutError) as err:
        messages["step"] = f"{type(err).__name__}: {err}"
    return messages


def test_refusals_and_deadlines():
    results = _run(refusals_task)
    for rank, messages in enumerate(results):
        assert "copies=True" in messages["no_copies"]
        if rank in (1, 2):  # the ranks that hold a copy
            assert "cut_routed_stage(copies=True)" in messages["not_cut"]
        else:
            assert "not_cut" not in messages
    assert results[1]["step"].startswith("ValueError") and "needs_inputs" in results[1]["step"]
    for rank in (0, 2, 3):
        assert results[rank]["step"].startswith("TimeoutError"), results[rank]["step"]
