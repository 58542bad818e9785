"""The zarr v3 documents of a checkpoint (`zarr.json` of each array and group, and the consolidated
root), written directly rather than through zarr's API: creating thousands of arrays one by one
through zarr costs seconds on the saving rank.

Each distinct (dtype, compression, rank) gets a template produced by zarr itself once, so the
documents stay exactly what zarr writes and reads.
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import zarr

from ..state.dtypes import storage_dtype
from .codec import ChunkCodec
from .fsio import write_buffers
from .save_plan import ArrayPlan

DOCUMENT = "zarr.json"
_GROUP: dict[str, Any] = {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def array_document(array: ArrayPlan, *, compression: str) -> dict[str, Any]:
    doc = copy.deepcopy(_template(array.dtype, ChunkCodec.parse(compression).spec, len(array.shape)))
    doc["shape"] = list(array.shape)
    doc["chunk_grid"]["configuration"]["chunk_shape"] = list(array.shards)
    doc["codecs"][0]["configuration"]["chunk_shape"] = list(array.chunks)
    doc["attributes"] = {"tensor": array.name, "torch_dtype": array.dtype}
    return doc


def group_paths(arrays: Iterable[ArrayPlan]) -> list[str]:
    """Every group above the arrays, the root ('') first."""
    groups = {""}
    for array in arrays:
        groups.update(str(p) for p in PurePosixPath(array.path).parents if str(p) != ".")
    return sorted(groups, key=lambda g: (g.count("/") + bool(g), g))


def write_documents(directory: Path, arrays: Mapping[str, ArrayPlan], *, compression: str) -> None:
    """Write every group's and array's zarr.json (not fsynced: the commit fsyncs the tree)."""
    for group in group_paths(arrays.values()):
        (directory / group).mkdir(parents=True, exist_ok=True)
        write_buffers(directory / group / DOCUMENT, [_encode(_GROUP)], sync=False)
    for array in arrays.values():
        (directory / array.path).mkdir(parents=True, exist_ok=True)
        write_buffers(
            directory / array.path / DOCUMENT, [_encode(array_document(array, compression=compression))], sync=False
        )


def consolidated_root(arrays: Mapping[str, ArrayPlan], *, compression: str) -> bytes:
    """The root group document listing every node, so opening the group is one read."""
    nodes: dict[str, Any] = {g: _GROUP for g in group_paths(arrays.values()) if g}
    nodes.update({a.path: array_document(a, compression=compression) for a in arrays.values()})
    root = {**_GROUP, "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": nodes}}
    return _encode(root)


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2).encode()


@functools.cache
def _template(dtype: str, compression: str, ndim: int) -> dict[str, Any]:
    """What zarr itself writes for an array of this dtype, compression and rank."""
    numpy_dtype = storage_dtype(dtype)
    with tempfile.TemporaryDirectory() as store, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.create_array(
            store=store,
            shape=(1,) * ndim,
            chunks=(1,) * ndim,
            shards=(1,) * ndim,
            dtype=numpy_dtype,
            fill_value=0,
            config={"write_empty_chunks": True},  # a skipped all-zero chunk would hide a deleted one
            **ChunkCodec.parse(compression).zarr_codecs(itemsize=numpy_dtype.itemsize),
        )
        return json.loads((Path(store) / DOCUMENT).read_text())
