"""Interop with Hugging Face-style safetensors: export a checkpoint's model tensors, and initialize
(possibly sharded) targets from safetensors weights, each rank reading only its own slices."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..errors import CheckpointError, join_problems
from ..state.dtypes import as_numpy, torch_dtype
from ..state.layout import TensorLayout, fragment_of
from . import commit as commits
from .fsio import fsync_dir
from .reader import Checkpoint, ReadRequest, read_fragments
from .writer import io_error

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 << 30
DTYPES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
}


def export_safetensors(
    checkpoint: Checkpoint,
    out: Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    prefix: str = "model/",
    progress: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write the tensors under `prefix` (names without it) as shards of at most `max_shard_bytes`
    plus `model.safetensors.index.json`; floating tensors are cast to `dtype` when given.

    Written into a temporary folder beside `out`, renamed into place once complete: a failed export
    leaves `out` as it was, and an export never mixes with an older one's shards. A non-empty `out`
    is replaced only with `overwrite`."""
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not known: choose one of {sorted(DTYPES)}")
    cast = torch_dtype(DTYPES[dtype]) if dtype else None
    names = sorted(n for n in checkpoint.meta.arrays if n.startswith(prefix))
    if not names:
        raise CheckpointError(f"{checkpoint.path} has no tensors under {prefix!r}: nothing to export")
    shards = _shards(checkpoint, names, cast=cast, max_bytes=max_shard_bytes)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file: export into a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} is not empty: choose an empty or new folder, or pass --overwrite to replace it")
    tmp = out.parent / f".{out.name}.tmp-{commits.new_token()}"
    try:
        tmp.mkdir(parents=True)
        files = _write_shards(checkpoint, shards, tmp, names=names, cast=cast, prefix=prefix, progress=progress)
        old = out.parent / f".{out.name}.old-{commits.new_token()}"
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)  # the older export stays as it was
            raise
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise io_error(e, action=f"exporting to {out}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / f.name for f in files]


def _write_shards(
    checkpoint: Checkpoint,
    shards: list[list[str]],
    out: Path,
    *,
    names: list[str],
    cast: torch.dtype | None,
    prefix: str,
    progress: bool,
) -> list[Path]:
    weight_map, files, total = {}, [], 0
    with tqdm(total=len(names), unit="tensor", desc="export", disable=not progress) as bar:
        for i, shard in enumerate(shards):
            path = out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in shard:
                tensor = _read_whole(checkpoint, name)
                if cast is not None and tensor.is_floating_point():
                    tensor = tensor.to(cast)
                tensors[name[len(prefix) :]] = tensor
                total += tensor.numel() * tensor.element_size()
                bar.update()
            save_file(tensors, str(path), metadata={"format": "pt", "step": str(checkpoint.meta.step)})
            weight_map.update({n: path.name for n in tensors})
            files.append(path)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return files


def load_safetensors(source: Path, targets: Mapping[str, torch.Tensor], *, strict: bool = True) -> list[str]:
    """Fill `targets` (plain tensors or DTensors, by name) from safetensors weights; returns the
    names not found when not strict. Targets change only after every slice was read."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    where = _weight_files(Path(source))
    problems, missing, loaded = [], [], {}
    for name, target in targets.items():
        if name not in where:
            (problems if strict else missing).append(f"{name}: not in {source}")
            continue
        fragment = fragment_of(name, target, rank=rank)
        with safe_open(str(where[name]), framework="pt") as f:
            view = f.get_slice(name)
            shape = tuple(view.get_shape())
            if shape != tuple(target.shape):
                problems.append(f"{name}: shape {shape} in {where[name].name}, expected {tuple(target.shape)}")
                continue
            buf = torch.empty(fragment.local_shape, dtype=target.dtype)
            for box, local in fragment.pieces():
                buf[local] = view[box.slices()] if box.sizes else f.get_tensor(name)
        loaded[name] = buf
    if problems:
        raise CheckpointError(f"cannot initialize from {source}:\n{join_problems(problems)}")
    with torch.no_grad():
        for name, buf in loaded.items():
            target = targets[name]
            local = target.to_local() if hasattr(target, "to_local") else target
            local.copy_(buf)
    return missing


def _read_whole(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    array = checkpoint.meta.arrays[name]
    buf = torch.empty(array.shape, dtype=torch_dtype(array.dtype))
    read_fragments(checkpoint, [ReadRequest(TensorLayout(name, array.shape, array.dtype).fragment(0), as_numpy(buf))])
    return buf


def _shards(checkpoint: Checkpoint, names: list[str], *, cast: torch.dtype | None, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        array = checkpoint.meta.arrays[name]
        itemsize = cast.itemsize if cast is not None and torch_dtype(array.dtype).is_floating_point else array.itemsize
        nbytes = itemsize * (array.nbytes // array.itemsize)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _weight_files(source: Path) -> dict[str, Path]:
    """Tensor name -> file, from a file, or a folder with an index or a single model.safetensors."""
    if source.is_file():
        with safe_open(str(source), framework="pt") as f:
            return {n: source for n in f.keys()}
    index = source / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {n: source / f for n, f in weight_map.items()}
        outside = [n for n, p in files.items() if p.resolve().parent != source.resolve()]
        if outside:
            raise CheckpointError(f"{index} points outside its folder for {outside[:3]}: refusing to read it")
        return files
    single = source / "model.safetensors"
    if single.is_file():
        return _weight_files(single)
    raise CheckpointError(f"{source} has neither {INDEX_FILE} nor model.safetensors: pass a safetensors file or folder")
