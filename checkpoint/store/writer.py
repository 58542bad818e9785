"""Writing a checkpoint's arrays: create them once, then any process writes its own shards.

Layers, so a process without torch.distributed (the keeper) can persist host copies:
`plan.plan_save` (pure) -> `create_arrays` (one process) -> `write_fragments` (each writer, from
plain host arrays) -> `commit.commit` (one process, after every writer finished).
"""

from __future__ import annotations

import errno
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import CheckpointError, join_problems
from ..scratch import scratch
from ..state.dtypes import as_numpy
from ..state.layout import Fragment
from .codec import ChunkCodec
from .fsio import fsync_file, write_buffers
from .grid import ChunkIndex, chunk_key, chunks_in
from .save_plan import ArrayPlan, Piece, SavePlan
from .shard import shard_buffers
from .zarr_meta import write_documents

DEFAULT_IO_THREADS = 4


@dataclass(frozen=True)
class HostFragment:
    """One rank's local data of a tensor in host memory, with where it sits in the global tensor."""

    fragment: Fragment
    data: np.ndarray | torch.Tensor

    def array(self) -> np.ndarray:
        data = as_numpy(self.data) if isinstance(self.data, torch.Tensor) else self.data
        if tuple(data.shape) != self.fragment.local_shape:
            raise CheckpointError(
                f"tensor {self.fragment.layout.name!r}: host data has shape {tuple(data.shape)}, its fragment "
                f"says {self.fragment.local_shape}"
            )
        return data


def create_arrays(directory: Path, plan: SavePlan) -> None:
    """Create the zarr group and one array per tensor at its global shape (one process)."""
    try:
        write_documents(directory, plan.arrays, compression=plan.compression)
    except OSError as e:
        raise io_error(e, action="creating the checkpoint arrays") from e


def write_fragments(
    directory: Path,
    plan: SavePlan,
    *,
    rank: int,
    sources: Mapping[str, HostFragment],
    threads: int = DEFAULT_IO_THREADS,
    progress: bool = False,
) -> int:
    """Write and fsync every shard `plan` assigns to `rank`, from its host data; returns bytes written.

    All shards are written first and fsynced after, so the kernel flushes them in large batches
    instead of one journal commit per file.
    """
    codec = ChunkCodec.parse(plan.compression)
    jobs = []
    for array, piece in plan.writes_for(rank):
        source = sources.get(array.name)
        if source is None:
            raise CheckpointError(
                f"tensor {array.name!r}: rank {rank} must write {piece.box} but was given no data for it"
            )
        data = source.array()
        local = _local_slices(source.fragment, piece)
        for shard in chunks_in(piece.box, chunks=array.shards):
            jobs.append((array, shard, data, local, piece))
    bar = tqdm(
        total=sum(math.prod(a.shards) * a.itemsize for a, *_ in jobs),
        unit="B",
        unit_scale=True,
        desc="save",
        disable=not progress,
    )
    results: list[int | str] = []
    with bar, ThreadPoolExecutor(max(1, threads)) as pool:
        for job, result in zip(jobs, pool.map(lambda job: _write_shard(directory, codec, *job), jobs)):
            results.append(result)
            bar.update(math.prod(job[0].shards) * job[0].itemsize)
        if not any(isinstance(r, str) for r in results):
            results += pool.map(lambda job: _sync_shard(directory, job[0], job[1]), jobs)
    problems = [r for r in results if isinstance(r, str)]
    if problems:
        raise CheckpointError(f"rank {rank} could not write its shards:\n" + join_problems(problems))
    return sum(r for r in results if isinstance(r, int))


def io_error(e: OSError, *, action: str) -> CheckpointError:
    """A file-system failure as an error that says what to do about it."""
    hint = {
        errno.ENOSPC: "the disk is full: free space or lower checkpoint.keep",
        errno.EDQUOT: "the disk quota is exceeded: free space or lower checkpoint.keep",
        errno.EACCES: "the directory is not writable: fix its permissions or choose another checkpoint.dir",
        errno.EPERM: "the directory is not writable: fix its permissions or choose another checkpoint.dir",
        errno.EROFS: "the file system is read-only: choose another checkpoint.dir",
        errno.ENOTDIR: "a path component is a file, not a directory: choose another checkpoint.dir",
    }.get(e.errno or 0, "check the file system")
    return CheckpointError(f"{action} failed: {e}; {hint}")


def _local_slices(fragment: Fragment, piece: Piece) -> tuple[slice, ...]:
    for box, local in fragment.pieces():
        if box == piece.box:
            return local
    raise CheckpointError(
        f"tensor {fragment.layout.name!r}: rank {fragment.rank} does not hold {piece.box} it must write"
    )


def _write_shard(
    directory: Path,
    codec: ChunkCodec,
    array: ArrayPlan,
    shard: ChunkIndex,
    data: np.ndarray,
    local: tuple[slice, ...],
    piece: Piece,
) -> int | str:
    path = directory / array.path / chunk_key(shard)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks = (_encoded(codec, array, chunk, data, local, piece) for chunk in array.shard_shape.chunks_of(shard))
        return write_buffers(path, shard_buffers(chunks), sync=False)
    except OSError as e:
        return str(io_error(e, action=f"writing shard {chunk_key(shard)} of tensor {array.name!r} to {path}"))


def _encoded(
    codec: ChunkCodec, array: ArrayPlan, chunk: ChunkIndex, data: np.ndarray, local: tuple[slice, ...], piece: Piece
) -> list:
    """One chunk's encoded buffers, valid until the next chunk is encoded on this thread."""
    region = array.chunk_box(chunk)
    src = data[
        (
            *(
                slice(l.start + o - b, l.start + o - b + s)
                for l, o, b, s in zip(local, region.offsets, piece.box.offsets, region.sizes)
            ),
            ...,
        )
    ]
    if region.sizes != array.chunks:
        # zarr stores edge chunks at full chunk shape; the padding is never read back.
        padded = scratch(array.chunk_nbytes, slot=2).view(src.dtype).reshape(array.chunks)
        padded.fill(0)
        padded[tuple(slice(0, s) for s in region.sizes)] = src
        src = padded
    return list(codec.encode(src))


def _sync_shard(directory: Path, array: ArrayPlan, shard: ChunkIndex) -> int | str:
    path = directory / array.path / chunk_key(shard)
    try:
        fsync_file(path)
        return 0
    except OSError as e:
        # Delayed allocation can report a full disk only now.
        return str(io_error(e, action=f"flushing shard {chunk_key(shard)} of tensor {array.name!r} to {path}"))
