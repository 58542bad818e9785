"""Hugging Face Llama folders, out and in: `export_hf` writes a checkpoint's model as a folder that
`LlamaForCausalLM.from_pretrained` opens; `load_hf` fills a fresh run's model from such a folder.

The tensors go through `safetensors_io` under `NameMap.hugging_face` (names, and the query/key rows
permuted between RoPE conventions). What the shapes cannot tell (head counts, RoPE base, norm epsilon,
tied embeddings) comes from the model config the trainer records in every checkpoint's JSON state
on the way out, and from config.json on the way in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .name_map import NameMap
from .reader import Checkpoint
from .safetensors_io import DEFAULT_MAX_SHARD_BYTES, DTYPES, _read_whole, export_safetensors, load_safetensors

CONFIG_FILE = "config.json"
PREFIX = "hf:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# What config.json must say for resurgo's model to compute the same function.
_REQUIRED = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def export_hf(
    checkpoint: Checkpoint,
    out: Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
    overwrite: bool = False,
    tokenizer: Path | None = None,
) -> list[Path]:
    """Write `checkpoint`'s model as a Hugging Face LlamaForCausalLM folder (config.json,
    generation_config.json, sharded safetensors and their index; a tied head is not written twice).
    `tokenizer`: a Hugging Face tokenizer folder whose files are copied in; without it the folder
    has no tokenizer (resurgo's byte tokenizer has none to give)."""
    model = recorded_model(checkpoint)
    tied = _tied(checkpoint, model)
    config = hf_config(model, checkpoint, dtype=dtype, tied=tied)
    extra = {
        CONFIG_FILE: _json_bytes(config),
        "generation_config.json": _json_bytes({"_from_model_config": True}),
        **_tokenizer_files(tokenizer),
    }
    return export_safetensors(
        checkpoint,
        out,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
        overwrite=overwrite,
        name_map=NameMap.hugging_face(n_heads=model["n_heads"], n_kv_heads=model["n_kv_heads"]),
        exclude={"output.weight"} if tied else (),
        extra_files=extra,
    )


def recorded_model(checkpoint: Checkpoint) -> dict[str, Any]:
    """The model config the checkpoint's JSON state records; a clear error for checkpoints written
    before it was recorded, since head counts, RoPE base and epsilon cannot be read from shapes."""
    model = model_record(checkpoint.meta.states.of_rank(0)) if checkpoint.meta.states.trees else None
    if model is None:
        raise CheckpointError(
            f"{checkpoint.path} does not record its model config (n_heads, n_kv_heads, rope_theta, norm_eps, "
            "tie_embeddings cannot be read from tensor shapes): resume it with this resurgo and save a step, "
            "or export --to safetensors and write config.json by hand"
        )
    return model


def model_record(states: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model config among the JSON states of a checkpoint (the trainer's progress state keeps it
    as `model`), or None."""
    for tree in states.values():
        model = tree.get("model") if isinstance(tree, Mapping) else None
        if isinstance(model, Mapping) and "n_heads" in model and "rope_theta" in model:
            return dict(model)
    return None


def _tied(checkpoint: Checkpoint, model: Mapping[str, Any]) -> bool:
    """Whether the head is the embedding: recorded so, and equal in the checkpoint. A run whose two
    tensors differ computed with its own head, so its export keeps that head."""
    if not model["tie_embeddings"] or "model/output.weight" not in checkpoint.meta.arrays:
        return bool(model["tie_embeddings"])
    head, table = (_read_whole(checkpoint, f"model/{n}.weight") for n in ("output", "tok_embeddings"))
    return torch.equal(head, table)


def hf_config(model: Mapping[str, Any], checkpoint: Checkpoint, *, dtype: str | None, tied: bool) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM: sizes from the tensors' shapes, the rest from `model`."""
    arrays = checkpoint.meta.arrays
    vocab, dim = _shape(checkpoint, "model/tok_embeddings.weight")
    hidden = _shape(checkpoint, "model/layers.0.feed_forward.w1.weight")[0]
    layers = len({n.split(".")[1] for n in arrays if n.startswith("model/layers.")})
    heads, kv_heads = int(model["n_heads"]), int(model["n_kv_heads"])
    if dim % heads or heads % kv_heads:
        raise CheckpointError(
            f"{checkpoint.path}: its recorded n_heads={heads}, n_kv_heads={kv_heads} do not fit dim={dim}"
        )
    stored = checkpoint.meta.arrays["model/tok_embeddings.weight"].dtype
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": dim // heads,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": float(model["norm_eps"]),
        "rope_theta": float(model["rope_theta"]),
        "max_position_embeddings": int(model["max_seq_len"]),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "torch_dtype": DTYPES[dtype] if dtype else stored,
        "use_cache": True,
    }


def _shape(checkpoint: Checkpoint, name: str) -> tuple[int, ...]:
    array = checkpoint.meta.arrays.get(name)
    if array is None:
        raise CheckpointError(f"{checkpoint.path} has no {name!r}: it is not a checkpoint of resurgo's Llama model")
    return tuple(array.shape)


def _tokenizer_files(folder: Path | None) -> dict[str, bytes]:
    if folder is None:
        return {}
    found = {name: (Path(folder) / name).read_bytes() for name in TOKENIZER_FILES if (Path(folder) / name).is_file()}
    if not found:
        raise CheckpointError(
            f"{folder} holds none of {', '.join(TOKENIZER_FILES)}: pass a Hugging Face tokenizer folder"
        )
    return found


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


# ---- in -------------------------------------------------------------------------------------


def hf_folder(init_from: str) -> Path | None:
    """The folder of an `hf:PATH` source, None for any other form."""
    return Path(init_from[len(PREFIX) :]) if init_from.startswith(PREFIX) else None


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of a Hugging Face Llama folder, refused unless resurgo's model computes the same."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path} ({type(e).__name__}: {e}): checkpoint.init_from=hf:PATH needs a Hugging Face "
            "model folder with config.json and its safetensors"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object: it is not a Hugging Face config")
    wrong = [f"{k}={config[k]!r} (resurgo's model needs {v!r})" for k, v in _REQUIRED.items() if config.get(k, v) != v]
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        wrong.append(f"rope scaling {config.get('rope_scaling') or rope} (resurgo's model has plain RoPE)")
    heads, dim = config.get("num_attention_heads"), config.get("hidden_size")
    if heads and dim and config.get("head_dim") not in (None, dim // heads):
        wrong.append(f"head_dim={config['head_dim']} (resurgo's model needs hidden_size / num_attention_heads)")
    if wrong:
        raise CheckpointError(f"{path} describes a model resurgo's Llama cannot reproduce: {'; '.join(wrong)}")
    return config


def model_fields(config: Mapping[str, Any], *, where: Path) -> dict[str, Any]:
    """resurgo's `model.*` fields for a Hugging Face Llama config."""
    try:
        heads = int(config["num_attention_heads"])
        rope = config.get("rope_parameters") or {}
        return {
            "dim": int(config["hidden_size"]),
            "n_layers": int(config["num_hidden_layers"]),
            "n_heads": heads,
            "n_kv_heads": int(config.get("num_key_value_heads") or heads),
            "vocab_size": int(config["vocab_size"]),
            "ffn_hidden": int(config["intermediate_size"]),
            "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            "max_seq_len": int(config.get("max_position_embeddings", 2048)),
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {type(e).__name__}: {e}: a Llama config.json needs this field") from None


def hf_model_fields(init_from: str) -> dict[str, Any]:
    """The `model.*` fields an `hf:PATH` source fixes ({} for other sources)."""
    folder = hf_folder(init_from)
    if folder is None:
        return {}
    return model_fields(read_hf_config(folder), where=folder / CONFIG_FILE)


def load_hf(folder: Path, targets: Mapping[str, torch.Tensor], *, model: Mapping[str, Any] | None = None) -> None:
    """Fill a fresh model's `targets` (resurgo names, any sharding) from a Hugging Face Llama folder.
    `model`, the running model's config when known, must agree with config.json on what the shapes
    cannot show (a wrong head count would permute the rows wrongly, silently)."""
    fields = model_fields(read_hf_config(folder), where=Path(folder) / CONFIG_FILE)
    if model is not None:
        _check_agrees(fields, model, where=Path(folder) / CONFIG_FILE)
    name_map = NameMap.hugging_face(n_heads=fields["n_heads"], n_kv_heads=fields["n_kv_heads"])
    head = targets.get("output.weight") if fields["tie_embeddings"] else None
    load_safetensors(
        Path(folder), {n: t for n, t in targets.items() if head is None or n != "output.weight"}, name_map=name_map
    )
    if head is not None:
        # A tied head is absent from the files: it is the embedding table, read again for it (the
        # model's head may hold memory of its own).
        load_safetensors(Path(folder), {"tok_embeddings.weight": head}, name_map=name_map)


def _check_agrees(fields: Mapping[str, Any], model: Mapping[str, Any], *, where: Path) -> None:
    keys = ("n_heads", "n_kv_heads", "norm_eps", "rope_theta", "tie_embeddings")
    differ = [
        f"model.{k}={model[k]} (config.json: {fields[k]})"
        for k in keys
        if k in model and not _same(model[k], fields[k])
    ]
    if differ:
        raise CheckpointError(
            f"the model differs from {where}: {', '.join(differ)}; set these model fields as config.json says"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b
