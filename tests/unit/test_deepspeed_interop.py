"""`resurgo-ckpt convert --from deepspeed` on checkpoints that real DeepSpeed wrote (CPU, gloo, 2 ranks).

Each fixture trains a tiny model for two steps under ZeRO-N, saves, and records what the engine
itself holds (full fp32 master, both moments, the step, gathered by DeepSpeed's own helpers), then
takes one more step on a batch both ranks share; the converted checkpoint must hold exactly the
same tensors, and one AdamW step from it in plain torch must land on the same parameters.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import import_transformers, launch, read_metrics
from resurgo.checkpoint.errors import CheckpointError
from resurgo.checkpoint.state.dtypes import as_numpy, torch_dtype
from resurgo.checkpoint.state.layout import TensorLayout
from resurgo.checkpoint.state.stateful import ModelState, OptimizerState
from resurgo.checkpoint.store.checkpointer import Checkpointer
from resurgo.checkpoint.store.deepspeed_io import _adam, convert_deepspeed
from resurgo.checkpoint.store.name_map import NameMap
from resurgo.checkpoint.store.reader import Checkpoint, ReadRequest, read_fragments
from resurgo.checkpoint.store.safe_unpickle import UnsafePickle
from resurgo.launch.ckpt import main
from resurgo.trainer.config import CheckpointConfig, ModelConfig
from resurgo.trainer.model import Transformer

pytest.importorskip("deepspeed")

ADAM = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=16)  # the byte tokenizer's
SEQ = 8


def _llama_classes() -> tuple[type, type]:
    transformers = import_transformers()
    return transformers.LlamaConfig, transformers.LlamaForCausalLM


def _llama():
    LlamaConfig, LlamaForCausalLM = _llama_classes()
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return _llama()
    model = Transformer(TINY)
    model.init_weights(seed=0)
    return model


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _worker(rank: int, world: int, port: int, kind: str, stage: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    import deepspeed
    import deepspeed.comm.torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # DeepSpeed's shared-memory allreduce is a C++ extension compiled on first use (~1 min); gloo suffices.
    deepspeed.comm.torch.build_shm_op = lambda: None
    model = _model(kind)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {**ADAM, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for step in range(2):
        engine.backward(_loss(engine, _batch(100 * step + rank)))  # each rank its own data
        engine.step()
    engine.save_checkpoint(out, client_state={"universal_checkpoint_info": {}})
    params = dict(engine.module.named_parameters())
    reference = {
        "fp32": {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()},
        **{
            w: {n: safe_get_full_optimizer_state(p, w).clone() for n, p in params.items()}
            for w in ("exp_avg", "exp_avg_sq")
        },
        "step": next(iter(engine.optimizer.optimizer.state.values()))["step"].clone(),
    }
    engine.backward(_loss(engine, _batch(7)))  # the same batch on both ranks: the same step as one process
    engine.step()
    reference["next"] = {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()}
    if rank == 0:
        torch.save(reference, Path(out) / "reference.pt")
        if kind == "llama":
            model.config.to_json_file(Path(out) / "config.json")
    # Both ranks end together and close the group: a rank exiting while gloo's threads still run aborts.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fixtures:
    """DeepSpeed checkpoints made on first use, once per test session."""

    def __init__(self, root: Path) -> None:
        self.root, self.made = root, {}

    def zero(self, kind: str, stage: int) -> Path:
        key = f"{kind}-zero{stage}"
        if kind == "llama":
            pytest.importorskip("transformers")
        if key not in self.made:
            out = self.root / key
            mp.spawn(_worker, args=(2, _port(), kind, stage, str(out)), nprocs=2)
            self.made[key] = out
        return self.made[key]

    def universal(self, kind: str, stage: int) -> Path:
        key = f"{kind}-zero{stage}-universal"
        if key not in self.made:
            source = self.zero(kind, stage)
            out = self.root / key
            subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder"]
                + [str(source / "global_step2"), "--output_folder", str(out), "--num_extract_workers", "1"]
                + ["--num_merge_workers", "1"],
                check=True,
                capture_output=True,
                env={**os.environ, "DS_ACCELERATOR": "cpu"},
            )
            if (source / "config.json").exists():
                (out / "config.json").write_bytes((source / "config.json").read_bytes())
            self.made[key] = out
        return self.made[key]


@pytest.fixture(scope="session")
def ds(tmp_path_factory) -> Fixtures:
    return Fixtures(tmp_path_factory.mktemp("deepspeed"))


def _read(ckpt: Checkpoint, name: str) -> torch.Tensor:
    array = ckpt.meta.arrays[name]
    buf = torch.empty(array.shape, dtype=torch_dtype(array.dtype))
    read_fragments(ckpt, [ReadRequest(TensorLayout(name, array.shape, array.dtype).fragment(0), as_numpy(buf))])
    return buf


def _reference(folder: Path) -> dict:
    return torch.load(folder / "reference.pt", weights_only=True)


def _expect_same(converted: Path, reference: dict, rename: NameMap) -> None:
    ckpt = Checkpoint.open(converted)
    assert ckpt.meta.step == 2
    for theirs, full in reference["fp32"].items():
        ours, want = rename.to_resurgo(theirs, full)
        assert torch.equal(_read(ckpt, f"model/{ours}"), want), ours
        for what in ("exp_avg", "exp_avg_sq"):
            _, want = rename.to_resurgo(theirs, reference[what][theirs])
            assert torch.equal(_read(ckpt, f"optim/state/{ours}/{what}"), want), (ours, what)
        assert torch.equal(_read(ckpt, f"optim/state/{ours}/step"), reference["step"])
    assert len([n for n in ckpt.meta.arrays if n.startswith("model/")]) == len(reference["fp32"])


def _continue_in_torch(converted: Path, reference: dict) -> None:
    """One AdamW step in plain torch from the converted checkpoint lands where DeepSpeed's step did."""
    model = Transformer(TINY)
    model.init_weights(seed=1)  # other values, all overwritten by the load
    optim = torch.optim.AdamW(model.parameters(), **{**ADAM, "betas": tuple(ADAM["betas"])})
    for p in model.parameters():
        optim.state[p].update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    states = {"model": ModelState(model), "optim": OptimizerState(model, optim)}
    assert Checkpointer(CheckpointConfig(), root=converted.parent, states=states).load(converted) == 2
    _loss(model, _batch(7)).backward()
    optim.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference["next"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_resurgo_model_zero_converts_exactly_and_trains_on(ds, tmp_path, stage):
    source = ds.zero("resurgo", stage)
    assert main(["convert", "--from", "deepspeed", str(source), str(tmp_path)]) == 0  # the parent with `latest`
    converted = tmp_path / "step-00000002"
    reference = _reference(source)
    _expect_same(converted, reference, NameMap.identity())
    _continue_in_torch(converted, reference)


@pytest.mark.parametrize("stage", [3, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_hugging_face_llama_names_and_rows_are_translated(ds, tmp_path, stage):
    source = ds.zero("llama", stage)
    converted = convert_deepspeed(source / "global_step2", tmp_path, name_map=None, progress=False, overwrite=False)
    _expect_same(converted, _reference(source), NameMap.hugging_face(n_heads=4, n_kv_heads=2))


@pytest.mark.parametrize(
    ("kind", "stage"), [("resurgo", 2), pytest.param("llama", 3, marks=pytest.mark.slow)], ids=["zero2", "zero3"]
)
def test_universal_form_converts_to_the_same_checkpoint(ds, tmp_path, kind, stage):
    rename = NameMap.identity() if kind == "resurgo" else NameMap.hugging_face(n_heads=4, n_kv_heads=2)
    source = ds.universal(kind, stage)
    converted = convert_deepspeed(source, tmp_path, name_map=None, progress=True, overwrite=False)
    _expect_same(converted, _reference(ds.zero(kind, stage)), rename)
    if kind == "resurgo":
        _continue_in_torch(converted, _reference(ds.zero(kind, stage)))


def test_an_existing_step_is_kept_unless_overwrite(ds, tmp_path):
    source = ds.zero("resurgo", 2)
    convert_deepspeed(source, tmp_path, name_map=None, progress=False, overwrite=False)
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        convert_deepspeed(source, tmp_path, name_map=None, progress=False, overwrite=False)
    assert convert_deepspeed(source, tmp_path, name_map=None, progress=False, overwrite=True).is_dir()
    assert not list(tmp_path.glob(".deepspeed-import-*"))  # the staging area is gone


def _copy_step(source: Path, into: Path) -> Path:
    into.mkdir()
    for f in (source / "global_step2").iterdir():
        (into / f.name).write_bytes(f.read_bytes())
    return into


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_asking_for_os_system_is_refused(ds, tmp_path):
    folder = _copy_step(ds.zero("resurgo", 2), tmp_path / "global_step2")
    # A real torch archive whose pickle calls os.system when unpickled without an allowlist.
    marker = tmp_path / "it-ran"
    torch.save({"optimizer_state_dict": _System(marker)}, folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafePickle, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt.*(posix|os)\.system"):
        convert_deepspeed(folder, tmp_path / "out", name_map=None, progress=False, overwrite=False)
    assert not marker.exists()


def test_a_missing_optimizer_shard_is_named(ds, tmp_path):
    folder = _copy_step(ds.zero("resurgo", 2), tmp_path / "global_step2")
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"saved by 2 ranks.*zero_pp_rank_1_mp_rank_00_optim_states\.pt"):
        convert_deepspeed(folder, tmp_path / "out", name_map=None, progress=False, overwrite=False)


def test_another_architecture_needs_a_name_map(ds, tmp_path):
    folder = _copy_step(ds.zero("resurgo", 2), tmp_path / "global_step2")
    model = folder / "mp_rank_00_model_states.pt"
    state = torch.load(model, weights_only=True)
    state["param_shapes"] = [
        {f"encoder.block{i}.{n}": s for i, (n, s) in enumerate(g.items())} for g in state["param_shapes"]
    ]
    torch.save(state, model)
    with pytest.raises(
        CheckpointError, match=r"neither Hugging Face Llama's nor resurgo's.*encoder\.block0.*--name-map"
    ):
        convert_deepspeed(folder, tmp_path / "out", name_map=None, progress=False, overwrite=False)
    mapping = tmp_path / "map.json"
    mapping.write_text('{"names": {"encoder\\\\.block\\\\d+\\\\.(.*)": "\\\\1"}}')
    converted = convert_deepspeed(folder, tmp_path / "out", name_map=mapping, progress=False, overwrite=False)
    _expect_same(converted, _reference(ds.zero("resurgo", 2)), NameMap.identity())


def test_a_hugging_face_checkpoint_without_config_asks_for_it(ds, tmp_path):
    folder = _copy_step(ds.zero("llama", 3), tmp_path / "global_step2")
    with pytest.raises(CheckpointError, match="config.json"):
        convert_deepspeed(folder, tmp_path / "out", name_map=None, progress=False, overwrite=False)


def test_a_user_map_goes_before_the_hugging_face_rules(ds, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text('{"names": {"lm_head\\\\.weight": "output.weight"}}')
    converted = convert_deepspeed(
        ds.zero("llama", 3), tmp_path / "out", name_map=mapping, progress=False, overwrite=False
    )
    _expect_same(converted, _reference(ds.zero("llama", 3)), NameMap.hugging_face(n_heads=4, n_kv_heads=2))


def test_the_adam_step_is_read_from_a_tensor_an_int_or_the_group():
    moments = {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    for state, group in (({"step": torch.tensor(3.0)}, {}), ({"step": 3}, {}), ({}, {"step": 3})):
        optimizer = {"state": {0: {**state, **moments}}, "param_groups": [{"params": [0], **group}]}
        assert torch.equal(_adam(optimizer, 0, Path("shard.pt"))["step"], torch.tensor(3.0))
    with pytest.raises(CheckpointError, match="shard.pt: param group 0 has no Adam state"):
        _adam({"state": {}, "param_groups": [{"params": [0]}]}, 0, Path("shard.pt"))


def test_the_trainer_resumes_from_a_converted_checkpoint(ds, tmp_path):
    """The real launch path: `checkpoint.resume=` a converted ZeRO checkpoint, the data position and
    progress derived from its step, and training goes on from there."""
    main(["convert", "--from", "deepspeed", str(ds.zero("resurgo", 2)), str(tmp_path / "ckpt")])
    model = [f"model.{k}={v}" for k, v in dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256).items()]
    proc = launch(
        [
            *model,
            "model.max_seq_len=16",
            "train.seq_len=8",
            "train.steps=4",
            "train.log_every=1",
            "fault.keeper=off",
            f"checkpoint.resume={tmp_path / 'ckpt' / 'step-00000002'}",
        ],
        nproc=1,
        root=tmp_path,
    )
    assert "resume: from disk at step 2" in proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [3, 4]
