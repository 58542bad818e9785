"""Optimizer-state offloading through the real launch path: the same losses and the same universal
checkpoint as a non-offloaded run, on one process and under FSDP2, and resume with it switched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_resume import DISK, read_checkpoint
from test_topologies import BASE, RTOL

from conftest import launch, read_metrics

# Several subgroups of the tiny model, half of them streamed through the staging buffers.
OFFLOAD = [
    "optim.offload.mode=cpu",
    "optim.offload.cpu_impl=torch",
    "optim.offload.subgroup_mb=0.05",
    "optim.offload.device_fraction=0.5",
]
LAST = "step-00000010"


def run(tmp: Path, name: str, overrides: list[str], *, nproc: int = 1) -> tuple[list[dict], Path]:
    ckpt = tmp / f"{name}-ckpt"
    launch(BASE + DISK + [f"checkpoint.dir={ckpt}", *overrides], nproc=nproc, root=tmp, name=name, extra_torchrun=[])
    return read_metrics(tmp / name), ckpt


def assert_same_checkpoints(got: Path, want: Path) -> None:
    a, b = read_checkpoint(got), read_checkpoint(want)
    assert a.keys() == b.keys() and any(k.startswith("optim/") or "exp_avg" in k for k in a)
    for name, value in b.items():
        assert a[name].dtype == value.dtype and np.array_equal(a[name], value), name


TOPOLOGIES = {
    "1": (1, []),
    "dp_shard=2": (2, ["parallel.dp_shard=2"]),
    "tp=2": (2, ["parallel.tp=2"]),
    "pp=2 + grad_accum=2": (2, ["parallel.pp=2", "train.grad_accum=2"]),
    "tp=2 x dp_shard=2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
}


@pytest.mark.parametrize(
    # tp=2 x dp_shard=2 (4 ranks) runs with the slow tests: tp=2 and dp_shard=2 cover each of its dimensions
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "tp=2 x dp_shard=2" else n for n in TOPOLOGIES],
)
def test_offloaded_run_equals_adamw(tmp_path, name):
    """fp32, with clipping: losses and the whole checkpoint (parameters, moments, steps) equal bit for bit."""
    nproc, topology = TOPOLOGIES[name]
    plain, plain_ckpt = run(tmp_path, "plain", topology, nproc=nproc)
    offloaded, offloaded_ckpt = run(tmp_path, "offloaded", topology + OFFLOAD, nproc=nproc)
    assert [r["loss"] for r in offloaded] == [r["loss"] for r in plain]
    assert all(r["offload_device_subgroups"] > 0 for r in offloaded)
    # after the first step, gradients of CPU-updated subgroups left the device during the backward pass
    assert all(r["offload_early_subgroups"] > 0 for r in offloaded if r["step"] > 1)
    assert_same_checkpoints(offloaded_ckpt / LAST, plain_ckpt / LAST)


@pytest.mark.parametrize(
    "first, then",
    [
        pytest.param(OFFLOAD, [], marks=pytest.mark.slow),  # "on at pp=2 -> off at tp=2" switches off too
        (
            ["parallel.dp_shard=2"],
            ["optim.offload.mode=cpu", "optim.offload.cpu_impl=torch", "optim.offload.subgroup_mb=0.05"],
        ),
        (["parallel.pp=2", *OFFLOAD], ["parallel.tp=2"]),
    ],
    ids=["on -> off", "off on dp_shard=2 -> on", "on at pp=2 -> off at tp=2"],
)
def test_resume_switching_offload(tmp_path, first, then):
    straight, _ = run(tmp_path, "straight", [])
    ckpt = f"checkpoint.dir={tmp_path}/ckpt"
    nprocs = [
        2 if any(o.startswith(("parallel.dp_shard=2", "parallel.pp=2", "parallel.tp=2")) for o in x) else 1
        for x in (first, then)
    ]
    launch(
        BASE + DISK + first + [ckpt, "train.steps=5"], nproc=nprocs[0], root=tmp_path, name="save", extra_torchrun=[]
    )
    launch(BASE + DISK + then + [ckpt, "checkpoint.resume=latest"], nproc=nprocs[1], root=tmp_path, name="load")
    resumed = read_metrics(tmp_path / "load")
    assert [r["step"] for r in resumed] == list(range(6, 11))
    for got, want in zip(resumed, straight[5:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=RTOL), (got["step"], got["loss"], want["loss"])
