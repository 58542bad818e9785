"""Every topology, launched through torchrun as a user would, follows the single-process losses."""

from __future__ import annotations

import pytest

from conftest import launch, read_metrics

STEPS = 10
BASE = ["experiment=smoke", f"train.steps={STEPS}", "train.precision=fp32"]
RTOL = 1e-4  # relative, per step; fp32 reductions in another order stay far below it

TOPOLOGIES = {
    "dp_shard=2": (2, ["parallel.dp_shard=2"]),
    "dp_replicate=2": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    "tp=2": (2, ["parallel.tp=2"]),
    "pp=2 GPipe": (2, ["parallel.pp=2", "parallel.pp_schedule=GPipe"]),
    "pp=2 1F1B": (2, ["parallel.pp=2", "parallel.pp_schedule=1F1B"]),
    "pp=2 Interleaved1F1B": (2, ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B"]),
    "tp=2 x dp_shard=2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    "pp=2 x tp=2": (4, ["parallel.pp=2", "parallel.tp=2"]),
    "pp=2 x dp_shard=2": (4, ["parallel.pp=2", "parallel.dp_shard=2"]),
    "dp_replicate=2 x dp_shard=2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "dp_shard=2 + activation checkpointing": (2, ["parallel.dp_shard=2", "train.activation_checkpoint=true"]),
    "pp=2 x tp=2 x dp_shard=2": (8, ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("reference")
    launch(BASE, nproc=1, root=root)
    return read_metrics(root / "run")


def assert_follows(records: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for got, want in zip(records, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=RTOL), (got["step"], got["loss"], want["loss"])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3)


# Eight ranks on two cores take long: the 3-D mesh runs with the slow tests, each of its pairs
# (pp x tp, tp x dp_shard, pp x dp_shard) in the default run.
SLOW_TOPOLOGIES = {"pp=2 x tp=2 x dp_shard=2"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TOPOLOGIES else n for n in TOPOLOGIES]
)
def test_topology_matches_single_process(name, reference, tmp_path):
    nproc, overrides = TOPOLOGIES[name]
    launch(BASE + overrides, nproc=nproc, root=tmp_path)
    assert_follows(read_metrics(tmp_path / "run"), reference)


ACCUMULATING = {
    "dp_shard=2": (2, ["parallel.dp_shard=2"]),
    "pp=2": (2, ["parallel.pp=2"]),
    "pp=2 x dp_shard=2": (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.microbatches=2"]),
}


# pp x dp_shard accumulating runs with the slow tests: each dimension accumulates in the default run,
# and the pair trains without accumulation there.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "pp=2 x dp_shard=2" else n for n in ACCUMULATING]
)
def test_grad_accumulation_matches(name, reference, tmp_path):
    """Under pipeline parallelism too: the schedule scales gradients by its micro-batch count only
    once every accumulation pass added its share."""
    nproc, overrides = ACCUMULATING[name]
    launch(BASE + ["train.grad_accum=2", *overrides], nproc=nproc, root=tmp_path)
    assert_follows(read_metrics(tmp_path / "run"), reference)


def test_training_reduces_the_loss(tmp_path):
    """Past the 10 warm-up steps, the mean loss of the last 5 steps falls well below that of the first
    5: about 0.4 here, while batch-to-batch noise (seen with optim.lr=0) moves these means by < 0.02."""
    launch(
        ["experiment=smoke", "train.steps=40", "train.precision=fp32", "optim.schedule.warmup_steps=10"],
        nproc=1,
        root=tmp_path,
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 40
    first, last = sum(losses[10:15]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.15, (first, last, losses)


def test_wrong_degrees_fail_with_a_clear_message(tmp_path):
    proc = launch(BASE + ["parallel.tp=3"], nproc=2, root=tmp_path, check=False)
    assert proc.returncode != 0
    assert "change the degrees" in proc.stdout + proc.stderr
