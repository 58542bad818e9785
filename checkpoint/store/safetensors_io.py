"""Interop with Hugging Face-style safetensors: export a checkpoint's model tensors, and initialize
(possibly sharded) targets from safetensors weights, each rank reading only its own slices.

A `NameMap` renames tensors on the way out and in, and carries the one tensor change a name needs
(the query/key row permutation between RoPE conventions), so other frameworks' layouts reuse this
code rather than a copy of it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..errors import CheckpointError, join_problems
from ..state.dtypes import as_numpy, torch_dtype
from ..state.layout import Box, TensorLayout, fragment_of
from . import commit as commits
from .fsio import replace_dir
from .name_map import NameMap
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
    name_map: NameMap | None = None,
    exclude: Collection[str] = (),
    extra_files: Mapping[str, bytes] | None = None,
) -> list[Path]:
    """Write the tensors under `prefix` (names without it) as shards of at most `max_shard_bytes`
    plus `model.safetensors.index.json`; floating tensors are cast to `dtype` when given.

    `name_map` gives each tensor the other side's name and convention, `exclude` leaves out names
    (without `prefix`), and `extra_files` (file name -> content) are written beside the shards.
    Written into a temporary folder beside `out`, renamed into place once complete: a failed export
    leaves `out` as it was, and an export never mixes with an older one's shards or files. A
    non-empty `out` is replaced only with `overwrite`."""
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not known: choose one of {sorted(DTYPES)}")
    cast = torch_dtype(DTYPES[dtype]) if dtype else None
    left_out = set(exclude)
    names = sorted(n for n in checkpoint.meta.arrays if n.startswith(prefix) and n[len(prefix) :] not in left_out)
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
        rename = name_map or NameMap.identity()
        files = _write_shards(
            checkpoint, shards, tmp, names=names, cast=cast, prefix=prefix, rename=rename, progress=progress
        )
        for file_name, content in (extra_files or {}).items():
            (tmp / file_name).write_bytes(content)
        replace_dir(tmp, out, token=commits.new_token())  # the older export stays as it was if this fails
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
    rename: NameMap,
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
                theirs, tensor = rename.from_resurgo(name[len(prefix) :], tensor)
                tensors[theirs] = tensor
                total += tensor.numel() * tensor.element_size()
                bar.update()
            save_file(tensors, str(path), metadata={"format": "pt", "step": str(checkpoint.meta.step)})
            weight_map.update({n: path.name for n in tensors})
            files.append(path)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return files


def load_safetensors(
    source: Path,
    targets: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    name_map: NameMap | None = None,
) -> list[str]:
    """Fill `targets` (plain tensors or DTensors, by resurgo name) from safetensors weights; returns
    the names not found when not strict. `name_map` translates the files' names and conventions.
    Targets change only after every slice was read."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    rename = name_map or NameMap.identity()
    where = _weight_files(Path(source))
    problems, missing, loaded = [], [], {}
    for name, target in targets.items():
        theirs = rename.other_name(name)
        if theirs not in where:
            shown = name if theirs == name else f"{theirs} (resurgo's {name})"
            (problems if strict else missing).append(f"{shown}: not in {source}")
            continue
        fragment = fragment_of(name, target, rank=rank)
        with safe_open(str(where[theirs]), framework="pt") as f:
            view = f.get_slice(theirs)
            shape = tuple(view.get_shape())
            if shape != tuple(target.shape):
                problems.append(f"{theirs}: shape {shape} in {where[theirs].name}, expected {tuple(target.shape)}")
                continue
            rows = _row_order(rename, theirs, shape)
            buf = torch.empty(fragment.local_shape, dtype=target.dtype)
            for box, local in fragment.pieces():
                buf[local] = _read_box(f, view, theirs, box, rows)
        loaded[name] = buf
    if problems:
        raise CheckpointError(f"cannot initialize from {source}:\n{join_problems(problems)}")
    with torch.no_grad():
        for name, buf in loaded.items():
            target = targets[name]
            local = target.to_local() if hasattr(target, "to_local") else target
            local.copy_(buf)
    return missing


def _row_order(rename: NameMap, theirs: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Which of the file's rows each of resurgo's rows is, when the map reorders them (else None):
    the map applied to the row numbers, so a rank reads only the rows its slice needs."""
    if not shape:
        return None
    rows = rename.to_resurgo(theirs, torch.arange(shape[0]).unsqueeze(1))[1][:, 0]
    return None if torch.equal(rows, torch.arange(shape[0])) else rows


def _read_box(f: Any, view: Any, name: str, box: Box, rows: torch.Tensor | None) -> torch.Tensor:
    """`box` of resurgo's tensor from the file: the rows it needs (one span), then reordered."""
    if not box.sizes:
        return f.get_tensor(name)
    if rows is None:
        return view[box.slices()]
    wanted = rows[box.offsets[0] : box.stops[0]]
    low, high = int(wanted.min()), int(wanted.max()) + 1
    return view[(slice(low, high), *box.slices()[1:])][wanted - low]


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
        absent = sorted({p.name for p in files.values() if not p.is_file()})
        if absent:
            raise CheckpointError(
                f"{index} lists {', '.join(absent)}, missing from {source}: copy the complete folder (every shard)"
            )
        return files
    single = source / "model.safetensors"
    if single.is_file():
        return _weight_files(single)
    raise CheckpointError(f"{source} has neither {INDEX_FILE} nor model.safetensors: pass a safetensors file or folder")
