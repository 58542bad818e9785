"""Hugging Face Llama folders out of and into resurgo: a trained run's export opens in transformers
with the logits of resurgo's own forward; a run started from a Hugging Face folder holds its weights
(and exports them back unchanged); mismatched configs and incomplete folders fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import import_transformers
from resurgo.checkpoint import Checkpoint, CheckpointError, export_hf, export_safetensors, latest
from resurgo.checkpoint.store.hf_io import load_hf
from resurgo.checkpoint.store.safetensors_io import load_safetensors

TINY = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "rope_theta": 500.0, "norm_eps": 1e-6}


@pytest.fixture(scope="module")
def hf():
    return import_transformers()


def _train(root: Path, overrides: dict) -> Checkpoint:
    """A real run in this process (one rank, no keeper); its newest checkpoint."""
    from resurgo.launch.training import train
    from resurgo.trainer.config import load_config

    base = {
        "train": {"device": "cpu", "seq_len": 16, "batch_size": 4, "log_every": 0, "precision": "fp32"},
        "fault": {"keeper": "off"},
        "run": {"root": str(root), "name": "run"},
    }
    cfg = load_config(_merge(base, overrides))
    train(cfg)
    return Checkpoint.open(latest(root / "run" / "checkpoints"))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resurgo_logits(ckpt: Checkpoint, tokens: torch.Tensor, tmp: Path) -> torch.Tensor:
    """resurgo's own forward with the checkpoint's weights (exported under resurgo's names)."""
    from resurgo.trainer.config import ModelConfig
    from resurgo.trainer.model import Transformer

    recorded = ckpt.meta.states.of_rank(0)["train"]["model"]
    model = Transformer(ModelConfig(**recorded))
    model.init_weights(seed=0)  # the RoPE table; every weight is then replaced
    export_safetensors(ckpt, tmp / "plain")
    load_safetensors(tmp / "plain", model.state_dict())
    with torch.no_grad():
        return model(tokens)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_export_of_a_trained_run_opens_in_transformers_with_resurgo_logits(tmp_path, hf):
    ckpt = _train(tmp_path, {"model": TINY, "train": {"steps": 2}, "checkpoint": {"every": 2}})
    files = export_hf(ckpt, tmp_path / "hf", max_shard_bytes=20_000)
    assert len(files) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["rope_theta"] == 500.0 and config["rms_norm_eps"] == 1e-6
    model = hf.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(tokens).logits
    ours = _resurgo_logits(ckpt, tokens, tmp_path)
    assert (theirs - ours).abs().max().item() < 1e-5

    from resurgo.launch.ckpt import main

    assert main(["export", "--to", "hf", str(ckpt.path), str(tmp_path / "hf"), "--dtype", "bf16", "--overwrite"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _tensors(tmp_path / "hf").values())


def _hf_folder(hf, folder: Path, *, tie: bool, max_shard_size: str | None = None) -> Path:
    config = hf.LlamaConfig(
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        rope_theta=500.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = hf.LlamaForCausalLM(config).float()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    return folder


def test_a_run_from_a_hugging_face_folder_holds_its_weights_and_exports_them_back(tmp_path, hf):
    src = _hf_folder(hf, tmp_path / "src", tie=True)
    # lr=0: the one step changes no weight, so its checkpoint holds exactly the initial weights.
    ckpt = _train(
        tmp_path,
        {"checkpoint": {"init_from": f"hf:{src}", "every": 1}, "optim": {"lr": 0.0}, "train": {"steps": 1}},
    )
    recorded = ckpt.meta.states.of_rank(0)["train"]["model"]
    assert (recorded["dim"], recorded["ffn_hidden"], recorded["tie_embeddings"]) == (32, 80, True)
    model = hf.LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model(tokens).logits
    assert (theirs - _resurgo_logits(ckpt, tokens, tmp_path)).abs().max().item() < 1e-5

    export_hf(ckpt, tmp_path / "back")
    before, after = _tensors(src), _tensors(tmp_path / "back")
    assert sorted(after) == sorted(before) and "lm_head.weight" not in after
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_tensor_parallel_ranks_read_their_rows_of_a_hugging_face_folder(tmp_path, hf):
    """tp=2: each rank reads its heads' permuted query/key rows; the step-1 checkpoint (lr=0)
    exports back to the folder's tensors exactly."""
    from conftest import launch

    src = _hf_folder(hf, tmp_path / "src", tie=False)
    launch(
        [
            f"checkpoint.init_from=hf:{src}",
            "parallel.tp=2",
            "optim.lr=0",
            "train.steps=1",
            "checkpoint.every=1",
            "train.seq_len=16",
            "train.batch_size=4",
            "fault.keeper=off",
        ],
        nproc=2,
        root=tmp_path,
    )
    export_hf(Checkpoint.open(latest(tmp_path / "run" / "checkpoints")), tmp_path / "back")
    before, after = _tensors(src), _tensors(tmp_path / "back")
    assert sorted(after) == sorted(before) and all(torch.equal(before[n], after[n]) for n in before)


def test_a_model_override_that_contradicts_config_json_is_named(tmp_path, hf):
    from resurgo.trainer.config import load_config

    src = _hf_folder(hf, tmp_path / "src", tie=False)
    cfg = load_config({"checkpoint": {"init_from": f"hf:{src}"}, "model": {"dim": 32, "max_seq_len": 32}})
    assert (cfg.model.n_heads, cfg.model.hidden_dim, cfg.model.max_seq_len) == (4, 80, 32)
    with pytest.raises(ValueError, match=r"model\.n_heads=2 \(config.json: 4\)") as e:
        load_config({"checkpoint": {"init_from": f"hf:{src}"}, "model": {"dim": 32, "n_heads": 2}})
    assert "model.dim" not in str(e.value)


def test_on_the_command_line_a_contradicting_model_override_stops_the_run(tmp_path, hf):
    from conftest import launch

    src = _hf_folder(hf, tmp_path / "src", tie=False)
    proc = launch(
        [f"checkpoint.init_from=hf:{src}", "model.n_kv_heads=4", "fault.keeper=off"],
        nproc=1,
        root=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "model.n_kv_heads=4 (config.json: 2)" in proc.stderr


def _targets(tie: bool) -> dict[str, torch.Tensor]:
    from resurgo.trainer.config import ModelConfig
    from resurgo.trainer.model import Transformer

    cfg = ModelConfig(**TINY, ffn_hidden=80, max_seq_len=64, tie_embeddings=tie)
    return Transformer(cfg).state_dict()


def test_a_missing_shard_or_tensor_is_named(tmp_path, hf):
    sharded = _hf_folder(hf, tmp_path / "sharded", tie=False, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (sharded / lost).unlink()
    with pytest.raises(CheckpointError, match=f"{lost}, missing from"):
        load_hf(sharded, _targets(tie=False))

    single = _hf_folder(hf, tmp_path / "single", tie=False)
    with safe_open(str(single / "model.safetensors"), framework="pt") as f:
        kept = {n: f.get_tensor(n) for n in f.keys() if n != "model.norm.weight"}
    save_file(kept, str(single / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight \(resurgo's norm\.weight\): not in"):
        load_hf(single, _targets(tie=False))


def test_a_checkpoint_without_its_model_config_cannot_become_a_hugging_face_folder(tmp_path):
    from resurgo.checkpoint import CheckpointConfig, ModelState
    from resurgo.checkpoint.store.checkpointer import Checkpointer
    from resurgo.trainer.config import ModelConfig
    from resurgo.trainer.model import Transformer

    model = Transformer(ModelConfig(**TINY))
    Checkpointer(CheckpointConfig(), root=tmp_path / "ck", states={"model": ModelState(model)}).save(1)
    with pytest.raises(CheckpointError, match="does not record its model config"):
        export_hf(Checkpoint.open(latest(tmp_path / "ck")), tmp_path / "hf")


def test_a_slice_of_permuted_rows_reads_only_its_heads_rows(tmp_path):
    """A tensor-parallel or FSDP rank's box of a query projection: the rows it reads from the file
    are those of its heads, reordered as the whole tensor's permutation would place them."""
    from resurgo.checkpoint import NameMap
    from resurgo.checkpoint.state.layout import Box
    from resurgo.checkpoint.store.safetensors_io import _read_box, _row_order

    weight = torch.randn(32, 6)
    save_file({"model.layers.0.self_attn.q_proj.weight": weight}, str(tmp_path / "w.safetensors"))
    name_map = NameMap.hugging_face(n_heads=4, n_kv_heads=2)
    whole = name_map.to_resurgo("model.layers.0.self_attn.q_proj.weight", weight)[1]
    rows = _row_order(name_map, "model.layers.0.self_attn.q_proj.weight", (32, 6))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        view = f.get_slice("model.layers.0.self_attn.q_proj.weight")
        for box in (Box((8, 2), (8, 3)), Box((5, 0), (14, 6)), Box((0, 0), (32, 6))):
            got = _read_box(f, view, "model.layers.0.self_attn.q_proj.weight", box, rows)
            assert torch.equal(got, whole[box.slices()])
    assert _row_order(name_map, "model.layers.0.self_attn.v_proj.weight", (16, 6)) is None
