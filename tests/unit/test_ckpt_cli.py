"""`resurgo-ckpt` commands on a small single-process checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ckpt_workers import TensorState

from resurgo.checkpoint.errors import CheckpointError
from resurgo.checkpoint.store.checkpointer import Checkpointer
from resurgo.checkpoint.store.safetensors_io import load_safetensors
from resurgo.launch.ckpt import main
from resurgo.trainer.config import CheckpointConfig


def _model(scale: float) -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(96.0).reshape(12, 8) * scale,
        "b": torch.full((5,), scale),
        "mask": torch.tensor([True, False]),
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for step, scale, compression in ((1, 1.0, "none"), (2, 1.5, "zstd")):
        cfg = CheckpointConfig(keep=3, compression=compression)
        states = {"model": TensorState(_model(scale)), "extra": TensorState({"lr": 0.1})}
        Checkpointer(cfg, root=tmp_path, states=states, max_chunk_bytes=96).save(step)
    return tmp_path


def test_inspect_shows_step_topology_and_tensors(root, capsys):
    assert main(["inspect", str(root)]) == 0  # a root resolves to its newest checkpoint
    out = capsys.readouterr().out
    assert "step        2" in out and '"world_size": 1' in out and "zstd" in out
    assert "model/w" in out and "[12, 8]" in out and "384 B" in out


def test_verify_passes_then_lists_every_problem(root, capsys):
    assert main(["verify", str(root / "step-00000002")]) == 0
    (root / "step-00000002/model/w/c/0/0").write_bytes(b"garbage")
    (root / "step-00000002/model/b/c/0").unlink()
    assert main(["verify", str(root / "step-00000002")]) == 1
    out = capsys.readouterr().out
    assert (
        "2 problem(s)" in out and "'model/w' shard c/0/0 is 7 bytes" in out and "'model/b' shard c/0 is missing" in out
    )


def test_diff_reports_max_abs_difference(root, capsys):
    assert main(["diff", str(root / "step-00000001"), str(root / "step-00000002")]) == 0
    lines = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert float(lines["model/w"]) == pytest.approx(95 * 0.5)
    assert float(lines["model/mask"]) == 0.0


def test_export_to_safetensors_and_initialize_from_it(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    assert (
        main(
            [
                "export",
                "--to",
                "safetensors",
                str(root / "step-00000001"),
                str(out),
                "--dtype",
                "bf16",
                "--max-shard-size",
                "200B",
            ]
        )
        == 0
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"w", "b", "mask"} and len(set(index["weight_map"].values())) >= 2
    weights = {k: v for f in out.glob("model-*.safetensors") for k, v in load_file(f).items()}
    assert weights["w"].dtype == torch.bfloat16 and weights["mask"].dtype == torch.bool
    targets = {"w": torch.zeros(12, 8), "b": torch.zeros(5), "mask": torch.zeros(2, dtype=torch.bool)}
    assert load_safetensors(out, targets) == []
    assert all(torch.equal(targets[n], t) for n, t in _model(1.0).items())
    with pytest.raises(CheckpointError, match=r"w: shape \(12, 8\).*expected \(3,\)"):
        load_safetensors(out, {"w": torch.zeros(3)})


def test_plan_lists_chunks_and_bytes_per_rank(root, tmp_path, capsys):
    layouts = [
        {
            "layout": {
                "name": "model/w",
                "shape": [12, 8],
                "dtype": "float32",
                "mesh": {"axes": ["tp"], "sizes": [2], "ranks": [0, 1]},
                "placements": [{"kind": "shard", "dim": 0}],
            }
        },
        {"layout": {"name": "model/b", "shape": [5], "dtype": "float32"}, "ranks": [1]},
    ]
    (tmp_path / "layouts.json").write_text(json.dumps(layouts))
    assert main(["plan", str(root / "step-00000001"), "--layouts", str(tmp_path / "layouts.json"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["0"]["model/w"] == {"shards": ["c/0/0"], "chunks": 2, "bytes": 2 * (96 + 4)}  # rows 0-5: two 6x4 tiles
    assert plan["1"]["model/w"]["chunks"] == 2 and plan["1"]["model/b"] == {"shards": ["c/0"], "chunks": 1, "bytes": 24}


def test_errors_exit_2_with_the_message(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plain_zarr_reads_a_compressed_checkpoint(root):
    import warnings

    import numpy as np
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open(str(root / "step-00000002"), mode="r")  # saved with zstd
        np.testing.assert_array_equal(group["model/w"][...], _model(1.5)["w"].numpy())
        np.testing.assert_array_equal(group["model/mask"][...], _model(1.5)["mask"].numpy())


def test_export_refuses_a_non_empty_folder_replaces_it_only_when_told_and_never_mixes(root, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("hf")
    step1, step2 = str(root / "step-00000001"), str(root / "step-00000002")
    assert main(["export", "--to", "safetensors", step1, str(out), "--max-shard-size", "200B"]) == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2
    assert main(["export", "--to", "safetensors", step2, str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert main(["export", "--to", "safetensors", step2, str(out), "--overwrite"]) == 0
    assert [p.name for p in out.glob("*.safetensors")] == [
        "model-00001-of-00001.safetensors"
    ]  # no stale shard of step 1
    assert torch.equal(load_file(out / "model-00001-of-00001.safetensors")["b"], torch.full((5,), 1.5))
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary or replaced folder left
    (out.parent / "a-file").write_text("x")
    for target in (out.parent / "a-file", out.parent / "a-file" / "below"):
        assert main(["export", "--to", "safetensors", step2, str(target)]) == 2
        err = capsys.readouterr().err
        assert "error: " in err and "Traceback" not in err


def test_verify_refuses_a_shard_that_is_a_symlink_out_or_a_fifo(root, tmp_path_factory, capsys):
    outside = tmp_path_factory.mktemp("outside") / "secret"
    outside.write_bytes((root / "step-00000002/model/w/c/0/0").read_bytes())
    (root / "step-00000002/model/w/c/0/0").unlink()
    (root / "step-00000002/model/w/c/0/0").symlink_to(outside)
    import os

    (root / "step-00000002/model/b/c/0").unlink()
    os.mkfifo(root / "step-00000002/model/b/c/0")
    assert main(["verify", str(root / "step-00000002")]) == 1  # returns: a FIFO never blocks it
    out = capsys.readouterr().out
    assert "outside the checkpoint folder" in out and "not a regular file" in out


def _rewrite(folder: Path, change) -> None:
    """Change the checkpoint's document and reseal its marker, as a tampering tool would."""
    import crc32c

    data = json.loads((folder / "resurgo.json").read_text())
    change(data)
    raw = json.dumps(data).encode()
    (folder / "resurgo.json").write_bytes(raw)
    step = data["step"] if isinstance(data.get("step"), int) else 2
    (folder / "COMMITTED").write_text(json.dumps({"step": step, "metadata_crc32c": crc32c.crc32c(raw)}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(tensors=list(d["tensors"])), "field 'tensors' is list, not dict"),
        (lambda d: d["tensors"]["model/w"].update(chunks=[0, 0]), "'model/w': shape >= 0 and shards, chunks >= 1"),
        (lambda d: d["state"].update(rank_tree=[3]), "state.rank_tree"),
        (lambda d: d.pop("state"), "field 'state' is missing"),
        (lambda d: d.update(step=7), "holds step 7, but its folder"),
        (lambda d: d.update(step="2"), "field 'step' is str, not int"),
    ],
)
def test_a_tampered_document_is_one_error_naming_the_field(root, capsys, change, message):
    folder = root / "step-00000002"
    _rewrite(folder, change)
    for command in (
        ["verify", str(folder)],
        ["inspect", str(folder)],
        ["diff", str(folder), str(root / "step-00000001")],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_a_garbage_marker_is_reported_as_the_marker(root, capsys):
    (root / "step-00000002" / "COMMITTED").write_text("garbage")
    assert main(["inspect", str(root / "step-00000002")]) == 2
    assert "COMMITTED marker of" in capsys.readouterr().err
