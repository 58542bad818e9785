import pytest

from resurgo.parallel.dims import ParallelDims


def test_auto_dp_shard_fills_the_rest():
    dims = ParallelDims.resolve(pp=2, dp_replicate=1, dp_shard=-1, tp=2, world_size=8)
    assert (dims.dp_shard, dims.dp) == (2, 2)


@pytest.mark.parametrize(
    "degrees, world, message",
    [
        (dict(pp=2, dp_replicate=1, dp_shard=-1, tp=2), 6, "not divisible"),
        (dict(pp=1, dp_replicate=1, dp_shard=3, tp=2), 4, "processes were launched"),
        (dict(pp=0, dp_replicate=1, dp_shard=1, tp=1), 1, "must be >= 1"),
    ],
)
def test_invalid_degrees_are_refused(degrees, world, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims.resolve(**degrees, world_size=world)
