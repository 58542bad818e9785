"""DeepSpeed ZeRO checkpoints (stages 1, 2, 3, and `ds_to_universal` output) into universal checkpoints.

ZeRO keeps no tensor per parameter: each rank holds flat fp32 partitions, and a parameter is a range
of their concatenation. ZeRO-1/2 lay a parameter group's parameters end to end (with an alignment
gap after each) and cut the result into one piece per rank, so a parameter may straddle ranks.
ZeRO-3 pads every parameter to a multiple of the rank count and gives each rank the same share of
each, so a parameter is one equal slice from every rank, laid end to end in each rank's flat
buffer. The Adam moments are flat tensors with the very layout of the fp32 partitions.

Every `.pt` file is read through the allowlist of `safe_unpickle` (DeepSpeed need not be installed
and none of its code runs) and memory-mapped. Parameters are assembled one at a time: a parameter
held whole by one partition stays a view of the mapped file; one that must be joined or permuted
goes into a file-backed staging area beside the output, so the resident memory stays bounded by
the largest parameter whatever the model's size.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import CheckpointConfig
from ..errors import CheckpointError
from . import commit as commits
from .checkpointer import Checkpointer
from .name_map import HF_LLAMA, NameMap, UnknownName
from .safe_unpickle import load_torch, opaque

# The DeepSpeed classes its checkpoint files pickle (found by reading the files of ZeRO-1, 2, 3 and
# ds_to_universal): stand-ins that keep their fields; the reader never needs their values.
ALLOWED: dict[str, Any] = {
    name: opaque(name)
    for name in (
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    )
}

MOMENTS = ("exp_avg", "exp_avg_sq")
_HYPER = ("lr", "betas", "eps", "weight_decay")  # what any Adam's param group means the same by
_OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
_STEP = re.compile(r"global_step(\d+)")
# resurgo's own names: the right-hand sides of the Hugging Face rules, as patterns.
_RESURGO = [re.escape(name).replace(r"\\1", r"(\d+)") for name in HF_LLAMA.values()]


def convert_deepspeed(
    source: Path, out: Path, *, name_map: Path | None = None, progress: bool = False, overwrite: bool = False
) -> Path:
    """Write the DeepSpeed checkpoint `source` (a step folder, its parent with a `latest` file, or
    `ds_to_universal` output) as a universal checkpoint under the checkpoint root `out`: fp32 master
    weights, both Adam moments and the step. Returns the new step folder."""
    reader = open_deepspeed(Path(source))
    mapping = choose_map(reader, user_map=name_map)
    names = mapping.translate_all(reader.params)
    final = commits.step_dir(Path(out), reader.step)
    if final.exists() and not overwrite:
        raise CheckpointError(
            f"{final} already exists: choose another checkpoint root, or pass --overwrite to replace that step"
        )
    staging = _Staging(Path(out))
    try:
        model, optim = _collect(reader, mapping, names, staging=staging, progress=progress)
        keep = len(commits.committed(Path(out))) + 1 if Path(out).is_dir() else 1
        states = {"model": _Fixed(model), "optim": _Fixed(optim)}
        return Checkpointer(CheckpointConfig(keep=keep), root=Path(out), states=states, progress=progress).save(
            reader.step
        )
    finally:
        staging.close()


def choose_map(reader: DeepSpeedReader, *, user_map: Path | None) -> NameMap:
    """The user's map if given; else Hugging Face's when every name is one of its Llama names, else
    the identity when every name is already resurgo's; else an error listing the unknown names."""
    names = [*reader.params, *reader.buffers]
    hf_like = [n for n in names if _matches(n, HF_LLAMA)]
    if user_map is not None:
        return _user_map(reader.folder, user_map, hf_like=bool(hf_like))
    if names and len(hf_like) == len(names):
        n_heads, n_kv_heads = _heads(reader.folder, required=True)
        return NameMap.hugging_face(n_heads=n_heads, n_kv_heads=n_kv_heads)
    ours = [n for n in names if _matches(n, _RESURGO)]
    if len(ours) == len(names):
        return NameMap.identity()
    unknown = [n for n in names if n not in ours and n not in hf_like]
    if not unknown:
        raise UnknownName(
            f"{reader.folder} mixes Hugging Face names (e.g. {hf_like[:2]}) with resurgo's (e.g. {ours[:2]}): "
            "give one map for all with --name-map FILE"
        )
    raise UnknownName(
        f"{reader.folder}: {len(unknown)} of {len(names)} tensor names are neither Hugging Face Llama's nor "
        f"resurgo's, e.g. {unknown[:5]}: the checkpoint is of another architecture. Give a map with --name-map "
        'FILE ({"names": {regex: resurgo name}, "rotary": "halves"|"pairs"})'
    )


def _user_map(folder: Path, path: Path, *, hf_like: bool) -> NameMap:
    """The user's rules, tried before Hugging Face's when the checkpoint has Hugging Face names."""
    heads = _heads(folder, required=False)
    n_heads, n_kv_heads = heads or (0, 0)
    then = NameMap.hugging_face(n_heads=n_heads, n_kv_heads=n_kv_heads) if hf_like and heads else None
    try:
        return NameMap.from_file(path, n_heads=n_heads, n_kv_heads=n_kv_heads, then=then)
    except CheckpointError as e:
        if heads is None and "n_heads" in str(e):
            raise CheckpointError(
                f"{path} permutes query/key rows (rotary 'halves'), which needs the head counts: put the model's "
                f"config.json (num_attention_heads, num_key_value_heads) beside {folder}"
            ) from None
        raise


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def _heads(folder: Path, *, required: bool) -> tuple[int, int] | None:
    """(attention heads, key/value heads) from the Hugging Face `config.json` beside the checkpoint."""
    for place in (folder, *folder.parents[:2]):
        path = place / "config.json"
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
                n_heads = int(cfg["num_attention_heads"])
                return n_heads, int(cfg.get("num_key_value_heads") or n_heads)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: not a Hugging Face config with num_attention_heads ({e})") from None
    if not required:
        return None
    raise CheckpointError(
        f"{folder} holds a Hugging Face Llama, whose query/key rows must be permuted by head: put the model's "
        "config.json (with num_attention_heads and num_key_value_heads) beside the checkpoint folder"
    )


# --- reading ---------------------------------------------------------------------------------------


@dataclass
class DeepSpeedReader:
    """One step of a DeepSpeed checkpoint: the parameters' names and shapes, and a way to read each.

    `read(name, what)` gives the full fp32 tensor `what` ("fp32", "exp_avg", "exp_avg_sq") as pieces
    of flat memory-mapped tensors, in order; `steps[name]` is its Adam step and `groups[name]` its
    param group's hyperparameters."""

    folder: Path
    step: int
    params: dict[str, tuple[int, ...]]
    read: Callable[[str, str], list[torch.Tensor]]
    steps: dict[str, torch.Tensor]
    groups: dict[str, dict[str, Any]]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


def open_deepspeed(source: Path) -> DeepSpeedReader:
    """The reader for whatever `source` is: universal output, a step folder, or a parent with `latest`."""
    folder = _locate(source)
    if (folder / "zero").is_dir():
        return _universal(folder)
    if list(folder.glob("*bf16_zero_pp_rank_*_optim_states.pt")):
        raise CheckpointError(
            f"{folder} is from DeepSpeed's bf16 optimizer, whose layout this reader does not know: convert it with "
            "`python -m deepspeed.checkpoint.ds_to_universal` first and pass the output folder"
        )
    files = sorted(folder.glob("zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    if any(_OPTIM.fullmatch(f.name).group(2) != "00" for f in files) or list(folder.glob("layer_*model_states.pt")):
        raise CheckpointError(
            f"{folder} is tensor- or pipeline-parallel: convert it with `python -m deepspeed.checkpoint.ds_to_universal` "
            "first (it merges the model-parallel slices) and pass the output folder"
        )
    head = _load(files[0], what="DeepSpeed optimizer shard")["optimizer_state_dict"]
    if "fp32_flat_groups" in head:
        return _zero3(folder, head)
    if "single_partition_of_fp32_groups" in head:
        return _zero12(folder, head)
    raise CheckpointError(f"{files[0]} is not a ZeRO optimizer shard (no fp32 partitions in it)")


def _locate(source: Path) -> Path:
    """The folder holding one step: `source` itself, or the tag its `latest` file names."""
    if not source.is_dir():
        raise CheckpointError(
            f"{source} is not a folder: pass a DeepSpeed checkpoint folder (global_stepN or its parent)"
        )
    if (source / "zero").is_dir() or any(source.glob("*zero_pp_rank_*_optim_states.pt")):
        return source
    for marker in ("latest", "latest_universal"):
        if (source / marker).is_file():
            tag = (source / marker).read_text().strip()
            if (source / tag).is_dir():
                return _locate(source / tag)
            raise CheckpointError(f"{source / marker} names {tag!r}, which is not a folder in {source}")
    raise CheckpointError(
        f"{source} holds no DeepSpeed checkpoint: expected *_optim_states.pt files, a `latest` file naming a step "
        "folder, or ds_to_universal output (zero/<parameter>/fp32.pt)"
    )


def _load(path: Path, *, what: str) -> Any:
    return load_torch(path, ALLOWED, what=what)


def _rank_files(folder: Path, count: int, pattern: str, *, what: str) -> list[Path]:
    """The files of ranks 0..count-1, every one of them, or an error naming those missing."""
    paths = [folder / pattern.format(rank=r) for r in range(count)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{folder}: the checkpoint was saved by {count} ranks but {len(missing)} {what} file(s) are missing: "
            f"{missing[:8]}. Copy them from where the ranks saved them (each node writes its own), then convert again"
        )
    return paths


def _model_states(folder: Path) -> dict[str, Any]:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (folder / name).is_file():
            state = _load(folder / name, what="DeepSpeed model state")
            if state.get("frozen_param_shapes") or state.get("shared_params"):
                raise CheckpointError(
                    f"{folder / name}: the model has frozen or shared (tied) parameters, which this converter does "
                    "not carry over; train with every parameter trainable and untied, or convert the weights alone"
                )
            return state
    raise CheckpointError(f"{folder} has no mp_rank_00_model_states.pt: the DeepSpeed checkpoint is incomplete")


def _global_step(folder: Path, state: Mapping[str, Any]) -> int:
    if isinstance(state.get("global_steps"), int):
        return state["global_steps"]
    m = _STEP.fullmatch(folder.name.removesuffix("_universal"))
    if m:
        return int(m.group(1))
    raise CheckpointError(f"{folder}: neither the model state nor the folder name says the step")


def _buffers(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    module = state.get("module") or {}
    return {n: _fp32(module[n]) for n in state.get("buffer_names", []) if n in module}


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k in _HYPER}


def _span(flats: Sequence[torch.Tensor], start: int, length: int, *, of: str) -> list[torch.Tensor]:
    """Views of [start, start + length) of the concatenation of `flats` (the flat partitions `of` a tensor)."""
    pieces, base = [], 0
    for flat in flats:
        lo, hi = max(start, base), min(start + length, base + flat.numel())
        if lo < hi:
            pieces.append(flat.view(-1)[lo - base : hi - base])
        base += flat.numel()
    if sum(p.numel() for p in pieces) != length:
        raise CheckpointError(
            f"{of}: the flat partitions hold {base} values, fewer than the {start + length} its layout needs; "
            "the checkpoint is damaged or from a DeepSpeed version whose layout this reader does not know"
        )
    return pieces


def _adam(optimizer: Mapping[str, Any], group: int, path: Path) -> dict[str, Any]:
    """The Adam state of param group `group`'s flat partition in a torch optimizer state dict, its step
    a float32 scalar whether it was kept as a tensor (torch), an int (DeepSpeed's fused Adam) or on
    the group (older fused Adam)."""
    try:
        params = optimizer["param_groups"][group]
        state = dict(optimizer["state"][params["params"][0]])
        step = state.get("step", params.get("step"))
        if step is not None and set(MOMENTS) <= state.keys():
            return {**state, "step": torch.as_tensor(step, dtype=torch.float32).reshape(())}
    except (KeyError, IndexError, TypeError):
        pass
    raise CheckpointError(
        f"{path}: param group {group} has no Adam state (step, exp_avg, exp_avg_sq): the optimizer never stepped "
        "or is not Adam; only Adam-family optimizers convert"
    )


def _zero12(folder: Path, head: Mapping[str, Any]) -> DeepSpeedReader:
    """ZeRO-1/2: group g is the concatenation of every rank's partition g, parameters end to end."""
    model = _model_states(folder)
    world = max(head["partition_count"]) if isinstance(head["partition_count"], list) else head["partition_count"]
    files = _rank_files(folder, world, "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", what="optimizer shard")
    shards = [head, *(_load(f, what="DeepSpeed optimizer shard")["optimizer_state_dict"] for f in files[1:])]
    base = head["base_optimizer_state"]
    gaps = head.get("param_alignment_paddings")
    where: dict[str, tuple[int, int, int]] = {}  # name -> (group, offset, numel)
    params, steps, groups = {}, {}, {}
    for g, shapes in enumerate(model["param_shapes"]):
        offset = 0
        adam = _adam(base, g, files[0])
        for i, (name, shape) in enumerate(shapes.items()):
            params[name] = tuple(shape)
            where[name] = (g, offset, int(math.prod(shape)))
            steps[name] = adam["step"]
            groups[name] = _hyper(base["param_groups"][g])
            offset += where[name][2] + (gaps[g][i] if gaps else 0)

    def flats(g: int, what: str) -> list[torch.Tensor]:
        if what == "fp32":
            return [s["single_partition_of_fp32_groups"][g] for s in shards]
        return [_adam(s["base_optimizer_state"], g, f)[what] for s, f in zip(shards, files)]

    def read(name: str, what: str) -> list[torch.Tensor]:
        g, offset, numel = where[name]
        return _span(flats(g, what), offset, numel, of=f"{folder}: {what} of {name!r}")

    return DeepSpeedReader(folder, _global_step(folder, model), params, read, steps, groups, _buffers(model))


def _zero3(folder: Path, head: Mapping[str, Any]) -> DeepSpeedReader:
    """ZeRO-3: each rank holds ceil(numel / ranks) values of every parameter, end to end."""
    world = head["partition_count"]
    _rank_files(folder, world, "zero_pp_rank_{rank}_mp_rank_00_model_states.pt", what="model state")
    files = _rank_files(folder, world, "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", what="optimizer shard")
    model = _model_states(folder)
    shards = [head, *(_load(f, what="DeepSpeed optimizer shard")["optimizer_state_dict"] for f in files[1:])]
    base = head["optimizer_state_dict"]
    where: dict[str, tuple[int, int]] = {}  # name -> (offset in each rank's flat buffer, share)
    params, steps, groups = {}, {}, {}
    offset = 0
    for g, shapes in enumerate(model["param_shapes"]):
        adam = _adam(base, g, files[0])
        for name, shape in shapes.items():
            params[name] = tuple(shape)
            share = -(-int(math.prod(shape)) // world)
            where[name] = (offset, share)
            steps[name] = adam["step"]
            groups[name] = _hyper(base["param_groups"][g])
            offset += share

    def flats(rank: int, what: str) -> list[torch.Tensor]:
        shard = shards[rank]
        if what == "fp32":
            return list(shard["fp32_flat_groups"])
        state = shard["optimizer_state_dict"]["state"]
        return [state[i][what] for i in sorted(state)]

    def read(name: str, what: str) -> list[torch.Tensor]:
        start, share = where[name]
        pieces = []
        for rank in range(world):
            pieces += _span(flats(rank, what), start, share, of=f"{files[rank]}: {what} of {name!r}")
        return _truncate(pieces, int(math.prod(params[name])))

    return DeepSpeedReader(folder, _global_step(folder, model), params, read, steps, groups, _buffers(model))


def _truncate(pieces: list[torch.Tensor], numel: int) -> list[torch.Tensor]:
    """The first `numel` values of `pieces`: ZeRO-3 pads the last rank's share."""
    out, left = [], numel
    for p in pieces:
        if left <= 0:
            break
        out.append(p[:left])
        left -= out[-1].numel()
    return out


def _universal(folder: Path) -> DeepSpeedReader:
    """`ds_to_universal` output: zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt, one whole tensor each
    (ZeRO-1/2: a dict with the tensor under "param"; ZeRO-3: the tensor, flattened)."""
    zero = folder / "zero"
    model = _model_states(folder)
    shapes = {n: tuple(s) for group in model.get("param_shapes", []) for n, s in group.items()}
    names = sorted(p.name for p in zero.iterdir() if (p / "fp32.pt").is_file())
    optimizer = _load(zero / "optimizer_state.pt", what="DeepSpeed optimizer state")
    base = optimizer.get("optimizer_state_dict") or {}
    group_of = {n: g for g, group in enumerate(model.get("param_shapes", [])) for n in group}
    params, steps, groups, buffers = {}, {}, {}, {}
    for name in names:
        if name not in shapes and not (zero / name / "exp_avg.pt").is_file():
            buffers[name] = _fp32(_whole(zero / name / "fp32.pt"))
            continue
        params[name] = shapes.get(name) or tuple(_whole(zero / name / "fp32.pt").shape)
        g = group_of.get(name, 0)
        groups[name] = _hyper(optimizer["param_groups"][g])
        if (zero / name / "step.pt").is_file():
            steps[name] = _step_file(zero / name / "step.pt")
        else:  # ZeRO-3's universal form keeps the step only in the optimizer state
            steps[name] = _adam(base, g, zero / "optimizer_state.pt")["step"]

    def read(name: str, what: str) -> list[torch.Tensor]:
        path = zero / name / f"{what}.pt"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: ds_to_universal wrote no {what} for {name!r}")
        return [_whole(path).reshape(-1)]

    return DeepSpeedReader(folder, _global_step(folder, model), params, read, steps, groups, buffers)


def _whole(path: Path) -> torch.Tensor:
    value = _load(path, what="DeepSpeed universal tensor")
    value = value.get("param") if isinstance(value, Mapping) else value
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{path} holds no tensor: it is not a ds_to_universal file")
    return value


def _step_file(path: Path) -> torch.Tensor:
    """A universal step.pt: a tensor (torch's Adam) or a number (DeepSpeed's fused Adam)."""
    value = _load(path, what="DeepSpeed universal step")
    if not isinstance(value, (torch.Tensor, int, float)):
        raise CheckpointError(f"{path} holds no step: it is not a ds_to_universal file")
    return torch.as_tensor(value, dtype=torch.float32).reshape(())


# --- writing ---------------------------------------------------------------------------------------


class _Fixed:
    """A Stateful over tensors that are already there: what the Checkpointer saves."""

    def __init__(self, tree: dict[str, Any]) -> None:
        self.tree = tree

    def state_dict(self) -> dict[str, Any]:
        return self.tree

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tree = state_dict


class _Staging:
    """File-backed arrays beside the output for tensors that must be joined or permuted, so that
    their pages can go back to disk instead of filling memory; removed when the save is done."""

    def __init__(self, root: Path) -> None:
        self.root, self.folder, self.count = root, None, 0

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.join([tensor.reshape(-1)], tuple(tensor.shape))

    def join(self, pieces: Sequence[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 tensor of `shape` holding `pieces` end to end, copied piece by piece."""
        if self.folder is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.folder = self.root / f".deepspeed-import-{commits.new_token()}"
            self.folder.mkdir()
        self.count += 1
        if not math.prod(shape):
            return torch.empty(shape)
        array = np.memmap(self.folder / f"{self.count}.bin", dtype=np.float32, mode="w+", shape=shape)
        flat, at = torch.from_numpy(array).view(-1), 0
        for piece in pieces:
            flat[at : at + piece.numel()].copy_(piece.reshape(-1))
            at += piece.numel()
        return flat.view(shape)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _collect(
    reader: DeepSpeedReader, mapping: NameMap, names: Mapping[str, str], *, staging: _Staging, progress: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and optimizer trees, as the trainer's `ModelState` and `OptimizerState` name them."""
    model: dict[str, Any] = {}
    state: dict[str, dict[str, Any]] = {}
    param_groups: dict[str, dict[str, Any]] = {}
    for name, tensor in reader.buffers.items():
        ours, value = mapping.to_resurgo(name, tensor)
        model[ours] = value
    for name in tqdm(reader.params, unit="tensor", desc="read deepspeed", disable=not progress):
        ours = names[name]
        model[ours] = _tensor(reader, mapping, name, "fp32", staging=staging)
        state[ours] = {what: _tensor(reader, mapping, name, what, staging=staging) for what in MOMENTS}
        state[ours]["step"] = reader.steps[name]
        param_groups[ours] = reader.groups[name]
    return model, {"state": state, "param_groups": param_groups}


def _tensor(reader: DeepSpeedReader, mapping: NameMap, name: str, what: str, *, staging: _Staging) -> torch.Tensor:
    """One full tensor in resurgo's convention: a view of the mapped file when it lies in one piece and
    needs no permutation, else assembled in the staging area."""
    shape = reader.params[name]
    pieces = reader.read(name, what)
    if sum(p.numel() for p in pieces) != int(math.prod(shape)):
        raise CheckpointError(f"{reader.folder}: {what} of {name!r} has the wrong size for its shape {shape}")
    single = len(pieces) == 1 and pieces[0].dtype == torch.float32
    whole = pieces[0].view(shape) if single else staging.join(pieces, shape)
    _, converted = mapping.to_resurgo(name, whole)
    return whole if converted is whole else staging.put(converted)
