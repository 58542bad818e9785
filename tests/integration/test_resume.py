"""Save on one topology, resume on the same or another, through the real launch path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from test_topologies import BASE, RTOL

from conftest import launch, read_metrics

# decay_steps fixed: a run stopped at step 5 follows the same learning-rate curve as one of 10.
DISK = ["optim.schedule.decay_steps=10", "fault.keeper=off", "checkpoint.every=5"]
PAIRS = {
    "1 -> tp=2": ([], 1, ["parallel.tp=2"], 2),
    "tp=2 -> pp=2": (["parallel.tp=2"], 2, ["parallel.pp=2"], 2),
    "dp_shard=2 -> dp_shard=4": (["parallel.dp_shard=2"], 2, ["parallel.dp_shard=4"], 4),
    "dp_shard=4 -> dp_shard=2": (["parallel.dp_shard=4"], 4, ["parallel.dp_shard=2"], 2),
    "pp=2 x tp=2 -> dp_shard=4": (["parallel.pp=2", "parallel.tp=2"], 4, ["parallel.dp_shard=4"], 4),
    "dp_shard=2 x tp=2 -> 1": (["parallel.dp_shard=2", "parallel.tp=2"], 4, [], 1),
    "pp=2 x tp=2 x dp_shard=2 -> pp=2 x dp_shard=2": (
        ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2"],
        8,
        ["parallel.pp=2", "parallel.dp_shard=2"],
        4,
    ),
    # 64 and 256 rows over 3 ranks: uneven FSDP shards on save.
    "dp_shard=3 (uneven) -> tp=2": (
        ["parallel.dp_shard=3", "train.batch_size=24"],
        3,
        ["parallel.tp=2", "train.batch_size=24"],
        2,
    ),
}


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint, read with plain zarr (no resurgo code)."""
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(array[...]) for name, array in group.arrays()} | {
        f"{sub}/{name}": arr for sub, g in group.groups() for name, arr in _walk(g)
    }


def _walk(group) -> list[tuple[str, np.ndarray]]:
    out = [(name, np.asarray(a[...])) for name, a in group.arrays()]
    for sub, g in group.groups():
        out += [(f"{sub}/{name}", arr) for name, arr in _walk(g)]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    launch(BASE + DISK + [f"checkpoint.dir={root}/ckpt"], nproc=1, root=root)
    return root


def test_resume_same_topology_is_bit_exact(uninterrupted, tmp_path):
    ckpt = f"checkpoint.dir={tmp_path}/ckpt"
    launch(BASE + DISK + [ckpt, "train.steps=5"], nproc=2, root=tmp_path, name="first", extra_torchrun=[])
    launch(BASE + DISK + [ckpt, "checkpoint.resume=latest"], nproc=2, root=tmp_path, name="second", extra_torchrun=[])
    straight = tmp_path / "straight"
    launch(BASE + DISK + [f"checkpoint.dir={straight}/ckpt"], nproc=2, root=straight, extra_torchrun=[])
    resumed, reference = read_metrics(tmp_path / "second"), read_metrics(straight / "run")
    assert [r["step"] for r in resumed] == list(range(6, 11))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference[5:]]
    final_resumed = read_checkpoint(tmp_path / "ckpt" / "step-00000010")
    final_straight = read_checkpoint(straight / "ckpt" / "step-00000010")
    assert final_resumed.keys() == final_straight.keys() and len(final_resumed) > 20
    for name, value in final_straight.items():
        assert np.array_equal(final_resumed[name], value), name


# Eight ranks on this machine's two cores take long: the 3-D save runs with the slow tests, and so do
# pp x tp -> dp_shard=4 and dp_shard=2 -> 4 (4 -> 2 reshards the same dimension); the other pairs cover
# resharding across each of pp, tp and dp_shard and from two of them at once (dp_shard x tp -> 1).
SLOW_PAIRS = {
    "pp=2 x tp=2 x dp_shard=2 -> pp=2 x dp_shard=2",
    "pp=2 x tp=2 -> dp_shard=4",
    "dp_shard=2 -> dp_shard=4",
}


@pytest.mark.parametrize("pair", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAIRS else p for p in PAIRS])
def test_resume_on_another_topology(pair, uninterrupted, tmp_path):
    save_overrides, save_procs, load_overrides, load_procs = PAIRS[pair]
    ckpt = f"checkpoint.dir={tmp_path}/ckpt"
    reference = read_metrics(uninterrupted / "run")
    if "train.batch_size=24" in save_overrides:
        launch(
            BASE + DISK + ["train.batch_size=24", f"checkpoint.dir={tmp_path}/ref"], nproc=1, root=tmp_path, name="ref"
        )
        reference = read_metrics(tmp_path / "ref")
    launch(
        BASE + DISK + save_overrides + [ckpt, "train.steps=5"],
        nproc=save_procs,
        root=tmp_path,
        name="save",
        extra_torchrun=[],
    )
    launch(
        BASE + DISK + load_overrides + [ckpt, "checkpoint.resume=latest"],
        nproc=load_procs,
        root=tmp_path,
        name="load",
        extra_torchrun=[],
    )
    resumed = read_metrics(tmp_path / "load")
    assert [r["step"] for r in resumed] == list(range(6, 11))
    for got, want in zip(resumed, reference[5:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=RTOL), (got["step"], got["loss"], want["loss"])


def test_plain_zarr_reads_a_full_parameter(uninterrupted):
    tensors = read_checkpoint(uninterrupted / "ckpt" / "step-00000010")
    weight = tensors["model/layers.0.attention.wq.weight"]
    assert weight.shape == (64, 64) and weight.dtype == np.float32 and np.isfinite(weight).all()


def test_metadata_records_the_model_config_and_library_versions(uninterrupted):
    from resurgo.checkpoint.store.metadata import read_metadata

    meta = read_metadata(uninterrupted / "ckpt" / "step-00000010")
    train = meta.states.of_rank(0)["train"]
    assert train["model"]["dim"] == 64 and train["model"]["n_layers"] == 4
    assert {"python", "torch", "zarr", "numcodecs"} <= set(train["versions"])


def test_export_to_safetensors_then_initialize_a_run_on_another_topology(uninterrupted, tmp_path):
    import subprocess
    import sys

    exported = tmp_path / "hf"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "resurgo.launch.ckpt",
            "export",
            "--to",
            "safetensors",
            str(uninterrupted / "ckpt" / "step-00000005"),
            str(exported),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (exported / "model.safetensors.index.json").exists()
    # lr=0: the one step changes no weight, so the checkpoint it writes holds exactly the initial weights.
    launch(
        BASE
        + DISK
        + [
            f"checkpoint.init_from={exported}",
            "train.steps=1",
            "checkpoint.every=1",
            "optim.lr=0",
            f"checkpoint.dir={tmp_path}/ckpt",
            "parallel.tp=2",
        ],
        nproc=2,
        root=tmp_path,
    )
    started = read_checkpoint(tmp_path / "ckpt" / "step-00000001")
    source = read_checkpoint(uninterrupted / "ckpt" / "step-00000005")
    model = [n for n in source if n.startswith("model/")]
    assert model and all(np.array_equal(started[n], source[n]) for n in model)


def test_resume_latest_skips_damaged_checkpoints_and_loads_the_newest_valid_one(tmp_path):
    """Step 4's chunk is damaged and step 6 holds only COMMITTED (an interrupted copy): the resume
    names both and loads step 2, which an exact path would not have replaced."""
    ckpt = tmp_path / "ckpt"
    overrides = BASE + [
        "optim.schedule.decay_steps=10",
        "fault.keeper=off",
        "checkpoint.every=2",
        f"checkpoint.dir={ckpt}",
    ]
    launch(overrides + ["train.steps=4"], nproc=1, root=tmp_path, name="first")
    shard = next(p for p in sorted((ckpt / "step-00000004").rglob("*")) if p.is_file() and p.parent.name == "c")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (ckpt / "step-00000006").mkdir()
    (ckpt / "step-00000006" / "COMMITTED").write_text("{}")
    proc = launch(overrides + ["train.steps=5", "checkpoint.resume=latest"], nproc=1, root=tmp_path, name="second")
    log = proc.stdout + proc.stderr
    assert "skipping checkpoint" in log and "step-00000006" in log and "step-00000004" in log
    assert "resume: from disk at step 2" in log
    assert [r["step"] for r in read_metrics(tmp_path / "second")] == [3, 4, 5]
