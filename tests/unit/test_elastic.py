import itertools

import pytest

from resurgo.parallel.config import ParallelConfig
from resurgo.parallel.dims import ParallelDims
from resurgo.parallel.elastic import fit_topology
from resurgo.trainer.config import TrainConfig


def topology(*, world_size, pp=1, dp_replicate=1, tp=1):
    dims = ParallelDims.resolve(pp=pp, dp_replicate=dp_replicate, dp_shard=-1, tp=tp, world_size=world_size)
    return {**dims.as_dict(), "world_size": world_size}


def dims_of(fitted, world_size):
    p = fitted.parallel
    return ParallelDims.resolve(
        pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, world_size=world_size
    )


@pytest.mark.parametrize("previous", [None, topology(world_size=4, tp=2)])
def test_same_world_changes_nothing(previous):
    parallel = ParallelConfig(tp=2)
    fitted = fit_topology(parallel, TrainConfig(batch_size=8, grad_accum=2), world_size=4, previous=previous)
    assert (fitted.parallel, fitted.grad_accum, fitted.note) == (parallel, 2, "")


def test_same_world_honours_changed_degrees():
    # The world did not change, so a different tp on the command line is the user's choice.
    parallel = ParallelConfig(tp=2)
    fitted = fit_topology(parallel, TrainConfig(batch_size=8), world_size=4, previous=topology(world_size=4))
    assert (fitted.parallel, fitted.note) == (parallel, "")


@pytest.mark.parametrize(
    "grad_accum, expected",
    [(1, 3), (2, 3)],  # 1 * 6/4 = 1.5: 2 does not split 12 over 4 ranks, 3 does; 2 * 6/4 = 3 exactly
)
def test_shrinking_dp_raises_grad_accum(grad_accum, expected):
    train = TrainConfig(batch_size=12, grad_accum=grad_accum)
    fitted = fit_topology(ParallelConfig(), train, world_size=4, previous=topology(world_size=6))
    assert (fitted.parallel.dp_shard, fitted.parallel.tp, fitted.grad_accum) == (4, 1, expected)
    assert fitted.note == f"world 6 -> 4: dp_shard 6 -> 4, grad_accum {grad_accum} -> {expected} (global batch 12 kept)"
    assert train.batch_size == 12  # the global batch is never touched


def test_grad_accum_skips_ratios_that_do_not_split_the_batch():
    # 6 -> 4 ranks: 1.5 rounds up to 2, but 36 % (4*2) != 0, so 3.
    fitted = fit_topology(ParallelConfig(), TrainConfig(batch_size=36), world_size=4, previous=topology(world_size=6))
    assert fitted.grad_accum == 3


def test_tp_is_kept_when_the_world_halves():
    fitted = fit_topology(
        ParallelConfig(tp=2), TrainConfig(batch_size=8), world_size=4, previous=topology(world_size=8, tp=2)
    )
    assert (fitted.parallel.tp, fitted.parallel.dp_shard, fitted.grad_accum) == (2, 2, 2)
    assert fitted.note == "world 8 -> 4: dp_shard 4 -> 2, grad_accum 1 -> 2 (global batch 8 kept)"


def test_tp_and_pp_come_from_the_resumed_run():
    fitted = fit_topology(
        ParallelConfig(), TrainConfig(batch_size=16), world_size=8, previous=topology(world_size=4, pp=2, tp=2)
    )
    assert (fitted.parallel.pp, fitted.parallel.tp, fitted.parallel.dp_shard) == (2, 2, 2)


def test_pp_times_tp_that_does_not_divide_is_refused():
    with pytest.raises(ValueError) as error:
        fit_topology(
            ParallelConfig(pp=2, tp=2),
            TrainConfig(batch_size=16),
            world_size=6,
            previous=topology(world_size=8, pp=2, tp=2),
        )
    message = str(error.value)
    assert "world size 6 is not divisible by parallel.pp*tp = 2*2" in message
    assert "(4 or 8)" in message
    assert "parallel.elastic=off" in message and "parallel.pp=1 parallel.tp=2" in message


@pytest.mark.parametrize(
    "previous_world, world, grad_accum, batch_size, expected",
    [
        (3, 6, 2, 12, 1),  # 2 * 3/6 = 1
        (2, 4, 3, 24, 2),  # 3 * 2/4 = 1.5: rounds up, never a larger micro-batch
        (2, 8, 1, 16, 1),  # never below 1
    ],
)
def test_growing_dp_lowers_grad_accum(previous_world, world, grad_accum, batch_size, expected):
    train = TrainConfig(batch_size=batch_size, grad_accum=grad_accum)
    fitted = fit_topology(ParallelConfig(), train, world_size=world, previous=topology(world_size=previous_world))
    assert (fitted.parallel.dp_shard, fitted.grad_accum) == (world, expected)


def test_replicas_are_kept_when_they_divide_and_folded_otherwise():
    parallel = ParallelConfig(dp_replicate=2)
    kept = fit_topology(
        parallel, TrainConfig(batch_size=16), world_size=4, previous=topology(world_size=8, dp_replicate=2)
    )
    assert (kept.parallel.dp_replicate, kept.parallel.dp_shard, kept.grad_accum) == (2, 2, 2)
    folded = fit_topology(
        parallel, TrainConfig(batch_size=12), world_size=3, previous=topology(world_size=6, dp_replicate=2)
    )
    assert (folded.parallel.dp_replicate, folded.parallel.dp_shard, folded.grad_accum) == (1, 3, 2)
    assert folded.note == "world 6 -> 3: dp_replicate 2 -> 1, grad_accum 1 -> 2 (global batch 12 kept)"


def test_pipeline_microbatches_take_part_in_the_split():
    parallel = ParallelConfig(pp=2, microbatches=4)
    fitted = fit_topology(parallel, TrainConfig(batch_size=48), world_size=6, previous=topology(world_size=8, pp=2))
    # 4 -> 3 data-parallel ranks: 48 % (3 * 4 microbatches * 2) == 0
    assert (fitted.parallel.dp_shard, fitted.grad_accum) == (3, 2)


def test_batch_that_cannot_be_split_is_refused():
    with pytest.raises(ValueError) as error:
        fit_topology(ParallelConfig(), TrainConfig(batch_size=12), world_size=5, previous=topology(world_size=6))
    message = str(error.value)
    assert "train.batch_size=12 does not split over 5 processes" in message
    assert "grad_accum >= 2" in message and "Launch 4 or 6 processes" in message


def test_pipeline_batch_refusal_names_the_microbatches():
    with pytest.raises(ValueError, match=r"degree 2 x parallel.microbatches=4 x train.grad_accum"):
        fit_topology(
            ParallelConfig(pp=2), TrainConfig(batch_size=36), world_size=4, previous=topology(world_size=6, pp=2)
        )


def test_explicit_degrees_own_the_configured_grad_accum():
    # dp_shard=6 names the dp that grad_accum=1 was chosen for: resuming again on 4 ranks (from a run
    # that already ran resized) keeps grad_accum 3 instead of falling back to 1.
    parallel, train = ParallelConfig(dp_shard=6), TrainConfig(batch_size=12)
    first = fit_topology(parallel, train, world_size=4, previous=None)
    assert (first.parallel.dp_shard, first.grad_accum) == (4, 3)
    assert first.note == "world 4: dp_shard 6 -> 4, grad_accum 1 -> 3 (global batch 12 kept)"
    again = fit_topology(parallel, train, world_size=4, previous=topology(world_size=4))
    assert (again.parallel.dp_shard, again.grad_accum, again.note) == (
        4,
        3,
        "world 4: grad_accum 1 -> 3 (global batch 12 kept)",
    )


def test_invalid_degrees_are_refused_not_resized():
    with pytest.raises(ValueError, match="dp_shard >= 1 or -1"):
        fit_topology(ParallelConfig(dp_shard=0), TrainConfig(), world_size=2, previous=topology(world_size=4))


def test_off_returns_the_config_as_given():
    parallel = ParallelConfig(dp_shard=6, elastic="off")
    fitted = fit_topology(parallel, TrainConfig(batch_size=12), world_size=4, previous=topology(world_size=6))
    assert (fitted.parallel, fitted.grad_accum, fitted.note) == (parallel, 1, "")


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match=r"parallel.elastic='grow'.*\('off', 'resize_dp'\)"):
        ParallelConfig(elastic="grow")
    parallel = ParallelConfig()
    parallel.elastic = "grow"  # set after validation, as a merged config could
    with pytest.raises(ValueError, match="choose one of"):
        fit_topology(parallel, TrainConfig(), world_size=2, previous=topology(world_size=4))


@pytest.mark.parametrize("old, new", list(itertools.product([2, 4, 6, 8], [2, 4, 6, 8])))
def test_resize_keeps_batch_and_micro_batch_bound(old, new):
    train = TrainConfig(batch_size=48)
    fitted = fit_topology(ParallelConfig(tp=2), train, world_size=new, previous=topology(world_size=old, tp=2))
    dims = dims_of(fitted, new)
    assert train.batch_size % (dims.dp * fitted.grad_accum) == 0
    before, after = train.batch_size // (old // 2), train.batch_size // (dims.dp * fitted.grad_accum)
    assert after <= before
    # the smallest grad_accum that does both
    assert not any(
        train.batch_size % (dims.dp * g) == 0 and train.batch_size // (dims.dp * g) <= before
        for g in range(1, fitted.grad_accum)
    )
