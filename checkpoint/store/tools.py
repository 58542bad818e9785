"""What the `resurgo-ckpt` commands compute: summaries, differences and read plans of checkpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import CheckpointError
from ..state.dtypes import storage_dtype, torch_dtype
from ..state.layout import Box, Fragment, TensorLayout
from .reader import Checkpoint, ReadRequest, read_fragments
from .save_plan import ReadPlan, plan_reads


def _written_by(meta) -> list[str]:
    """The model config and library versions the trainer's train state recorded, when it did."""
    train = meta.states.of_rank(0).get("train", {}) if meta.states.trees else {}
    return [f"{key:<11} {json.dumps(train[key], sort_keys=True)}" for key in ("model", "versions") if key in train]


def describe(checkpoint: Checkpoint) -> str:
    """Step, saving topology, and every tensor with its shape, dtype, bytes and how it was placed."""
    meta = checkpoint.meta
    lines = [
        f"checkpoint  {checkpoint.path}",
        f"step        {meta.step}",
        f"format      {meta.format_version}",
        f"topology    {json.dumps(dict(meta.topology), sort_keys=True)}",
        f"compression {meta.compression}",
        *_written_by(meta),
        f"tensors     {len(meta.arrays)} ({_bytes(sum(a.nbytes for a in meta.arrays.values()))})",
        "",
        f"{'name':<48} {'shape':<18} {'dtype':<9} {'bytes':>10}  {'shards':<14} {'chunks':<14} placement",
    ]
    for name, a in sorted(meta.arrays.items()):
        layout = a.layout
        placed = (
            "plain"
            if layout.mesh is None
            else f"{dict(zip(layout.mesh.axes, layout.mesh.sizes))} [{', '.join(map(str, layout.placements))}]"
        )
        lines.append(
            f"{name:<48} {str(list(a.shape)):<18} {a.dtype:<9} {_bytes(a.nbytes):>10}  {str(list(a.shards)):<14} {str(list(a.chunks)):<14} {placed}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class TensorDiff:
    name: str
    max_abs: float | None  # None: not comparable
    note: str = ""


def diff(a: Checkpoint, b: Checkpoint, *, progress: bool = False) -> list[TensorDiff]:
    """Max absolute difference per tensor, streaming over `a`'s chunks (memory: one chunk)."""
    out = []
    for name in tqdm(
        sorted(a.meta.arrays.keys() | b.meta.arrays.keys()), unit="tensor", desc="diff", disable=not progress
    ):
        x, y = a.meta.arrays.get(name), b.meta.arrays.get(name)
        if x is None or y is None:
            out.append(TensorDiff(name, None, f"only in {'B' if x is None else 'A'}"))
        elif x.shape != y.shape:
            out.append(TensorDiff(name, None, f"shape {x.shape} vs {y.shape}"))
        else:
            out.append(TensorDiff(name, _max_abs(a, b, name)))
    return out


def plan_for_layouts(checkpoint: Checkpoint, layouts_file: Path) -> ReadPlan:
    """The read plan for target layouts given as JSON: [{"layout": TensorLayout JSON, "ranks": [...]}].

    `ranks` defaults to the layout's mesh ranks; a plain tensor needs them listed.
    """
    try:
        entries = json.loads(Path(layouts_file).read_text())
        fragments = list(_fragments(entries))
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot read target layouts from {layouts_file}: {e}") from e
    return plan_reads(checkpoint.meta.arrays, fragments)


def _fragments(entries: list[dict[str, Any]]) -> Iterator[Fragment]:
    for entry in entries:
        layout = TensorLayout.from_json(entry["layout"])
        ranks = entry.get("ranks") or layout.ranks
        if not ranks:
            raise CheckpointError(f"tensor {layout.name!r}: a plain tensor needs 'ranks' (who holds it)")
        for rank in ranks:
            yield layout.fragment(int(rank))


def _max_abs(a: Checkpoint, b: Checkpoint, name: str) -> float:
    """Compared shard by shard of `a`, so memory stays at one shard of each."""
    x, y = a.meta.arrays[name], b.meta.arrays[name]
    worst = 0.0
    for shard in x.shard_indices():
        box = x.shard_box(shard)
        if box.numel == 0:
            continue
        mine, theirs = (_read_box(c, arr, box) for c, arr in ((a, x), (b, y)))
        worst = max(worst, _max_abs_of(_torch(mine, x.dtype), _torch(theirs, y.dtype)))
    return worst


def _read_box(checkpoint: Checkpoint, array, box: Box) -> np.ndarray:
    out = np.empty(box.sizes, dtype=storage_dtype(array.dtype))
    fragment = Fragment(
        TensorLayout(array.name, array.shape, array.dtype),
        0,
        tuple(((o, o + s),) for o, s in zip(box.offsets, box.sizes)),
    )
    read_fragments(checkpoint, [ReadRequest(fragment, out)])
    return out


def _torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.array(arr)).view(torch_dtype(dtype))  # a writable copy


def _max_abs_of(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    if x.dtype == torch.bool:
        return float((x != y).any())
    return float((x.double() - y.double()).abs().max())


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
