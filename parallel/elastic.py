"""Elastic topology: pick parallel degrees for a run that resumes on another number of processes.

Only data parallelism is resized. Tensor and pipeline degrees decide how every layer and stage is
cut, so keeping them keeps each rank's share of the model (and its memory) as it was. The global
batch never changes, so the training math is the same on any world size; grad_accum absorbs the
change of data-parallel degree, so that each rank's micro-batch (its activation memory) grows no
larger than the one the configured grad_accum was chosen for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from resurgo.parallel.config import ELASTIC_POLICIES, ParallelConfig
from resurgo.parallel.dims import AXES, ParallelDims


class Batching(Protocol):
    """What of the training loop's config the fit needs (the trainer's `Batching` has it)."""

    batch_size: int  # global, in sequences: never changed by a fit
    grad_accum: int


@dataclass(frozen=True)
class Fitted:
    """What to build the trainer with, and one log line saying what changed ("" when nothing)."""

    parallel: ParallelConfig
    grad_accum: int
    note: str


def fit_topology(
    parallel: ParallelConfig, train: Batching, *, world_size: int, previous: Mapping[str, int] | None = None
) -> Fitted:
    """Fit `parallel` and `train.grad_accum` to `world_size` under the `parallel.elastic` policy.

    `previous` is the topology of the run being resumed (`ParallelDims.as_dict()` plus
    "world_size"), None on a first start. An unchanged world size keeps the configured degrees when
    they fit, so that a deliberate change of degrees on resume is honoured, not undone.
    """
    if parallel.elastic not in ELASTIC_POLICIES:
        raise ValueError(f"parallel.elastic={parallel.elastic!r}: choose one of {ELASTIC_POLICIES}")
    same_world = previous is None or previous["world_size"] == world_size
    if parallel.elastic == "off" or (same_world and _resolves(parallel, world_size=world_size)):
        return Fitted(parallel=parallel, grad_accum=train.grad_accum, note="")

    before = dict(previous) if previous is not None else {a: getattr(parallel, a) for a in AXES}
    pp, tp = before["pp"], before["tp"]
    if min(pp, tp, parallel.dp_replicate) < 1 or parallel.dp_shard < 1 and parallel.dp_shard != -1:
        raise ValueError("parallel.pp, tp, dp_replicate must be >= 1 and parallel.dp_shard >= 1 or -1 (auto)")
    if world_size % (pp * tp):
        raise ValueError(_no_room_message(world_size=world_size, pp=pp, tp=tp))
    dp = world_size // (pp * tp)
    # A replica count that no longer divides becomes sharding: the same math on one axis fewer.
    dp_replicate = parallel.dp_replicate if dp % parallel.dp_replicate == 0 else 1
    fitted = replace(parallel, pp=pp, tp=tp, dp_replicate=dp_replicate, dp_shard=dp // dp_replicate)

    microbatches, reference_dp = fitted.n_microbatches if pp > 1 else 1, _reference_dp(parallel, previous)
    grad_accum = _grad_accum(train=train, dp=dp, microbatches=microbatches, reference_dp=reference_dp)
    if grad_accum is None:
        raise ValueError(
            _no_split_message(
                train=train,
                world_size=world_size,
                dp=dp,
                pp_tp=pp * tp,
                microbatches=microbatches,
                reference_dp=reference_dp,
            )
        )
    note = _note(
        before=before,
        after=fitted,
        world_size=world_size,
        grad_accum=(train.grad_accum, grad_accum),
        batch_size=train.batch_size,
    )
    return Fitted(parallel=fitted, grad_accum=grad_accum, note=note)


def _reference_dp(parallel: ParallelConfig, previous: Mapping[str, int] | None) -> int | None:
    """The data-parallel degree that the configured grad_accum was chosen for (None: unknown).

    Degrees that name dp outright own it on every resume, however many resizes came between;
    with dp_shard=-1 only the resumed run says which dp it ran with.
    """
    if parallel.dp_shard != -1:
        return parallel.dp_replicate * parallel.dp_shard
    return previous["dp_replicate"] * previous["dp_shard"] if previous is not None else None


def _grad_accum(*, train: Batching, dp: int, microbatches: int, reference_dp: int | None) -> int | None:
    """Smallest grad_accum that keeps each rank's micro-batch no larger than at the reference dp and
    splits the global batch evenly; None when none does."""
    per_pass = dp * microbatches
    at_least = _min_grad_accum(train=train, dp=dp, reference_dp=reference_dp)
    fits = (g for g in range(at_least, train.batch_size // per_pass + 1) if train.batch_size % (per_pass * g) == 0)
    return next(fits, None)


def _min_grad_accum(*, train: Batching, dp: int, reference_dp: int | None) -> int:
    """grad_accum * dp constant: sequences per rank per pass no more than at the reference dp."""
    return max(1, -(-train.grad_accum * reference_dp // dp)) if reference_dp else train.grad_accum


def _resolves(parallel: ParallelConfig, *, world_size: int) -> bool:
    try:
        ParallelDims.resolve(
            pp=parallel.pp,
            dp_replicate=parallel.dp_replicate,
            dp_shard=parallel.dp_shard,
            tp=parallel.tp,
            world_size=world_size,
        )
    except ValueError:
        return False
    return True


def _no_room_message(*, world_size: int, pp: int, tp: int) -> str:
    step, below = pp * tp, world_size // (pp * tp) * pp * tp
    sizes = f"{below} or {below + step}" if below else f"{step}"
    tp_fit = next(t for t in range(tp, 0, -1) if tp % t == 0 and world_size % t == 0)
    pp_fit = next(p for p in range(pp, 0, -1) if pp % p == 0 and (world_size // tp_fit) % p == 0)
    return (
        f"world size {world_size} is not divisible by parallel.pp*tp = {pp}*{tp}, which parallel.elastic=resize_dp "
        f"keeps: launch a multiple of {step} processes ({sizes}), or pass parallel.elastic=off with degrees that fit "
        f"{world_size} processes (for example parallel.pp={pp_fit} parallel.tp={tp_fit} parallel.dp_shard=-1)"
    )


def _no_split_message(
    *, train: Batching, world_size: int, dp: int, pp_tp: int, microbatches: int, reference_dp: int | None
) -> str:
    def splits(d: int) -> bool:
        return _grad_accum(train=train, dp=d, microbatches=microbatches, reference_dp=reference_dp) is not None

    # The world sizes nearest to this one whose data-parallel degree still splits the batch.
    below = next((d for d in range(dp - 1, 0, -1) if splits(d)), None)
    above = next((d for d in range(dp + 1, train.batch_size // microbatches + 1) if splits(d)), None)
    sizes = " or ".join(str(d * pp_tp) for d in (below, above) if d)
    pipeline = f" x parallel.microbatches={microbatches}" if microbatches > 1 else ""
    at_least = _min_grad_accum(train=train, dp=dp, reference_dp=reference_dp)
    return (
        f"train.batch_size={train.batch_size} does not split over {world_size} processes: it must be divisible by "
        f"data-parallel degree {dp}{pipeline} x train.grad_accum, with grad_accum >= {at_least} so that micro-batches "
        f"grow no larger, and the global batch is kept so that training does not change. Launch "
        f"{sizes or 'another number of'} processes, or pass parallel.elastic=off with a train.batch_size and "
        "train.grad_accum that fit"
    )


def _note(
    *, before: Mapping[str, int], after: ParallelConfig, world_size: int, grad_accum: tuple[int, int], batch_size: int
) -> str:
    changes = [f"{a} {before[a]} -> {getattr(after, a)}" for a in AXES if before[a] != getattr(after, a)]
    if grad_accum[0] != grad_accum[1]:
        changes.append(f"grad_accum {grad_accum[0]} -> {grad_accum[1]}")
    if not changes:
        return ""
    old_world = before.get("world_size", world_size)
    world = f"world {old_world} -> {world_size}" if old_world != world_size else f"world {world_size}"
    return f"{world}: {', '.join(changes)} (global batch {batch_size} kept)"
