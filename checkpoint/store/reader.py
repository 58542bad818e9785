"""Reading a checkpoint: only the chunks a fragment overlaps, each checked before it is used.

Loading is two passes over the same chunks. `check` maps every needed chunk and verifies that its
shard file and index exist (zarr would silently return zeros for a missing one), that it has the
right size and that it passes its crc32c; `Checked.apply` then copies them to their destinations (re-checking each). So a damaged
checkpoint changes no target, without staging a rank's whole state in extra host memory: the
second pass reads the page cache the first one filled.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..bulk_copy import copy_into
from ..errors import CheckpointError, join_problems
from ..scratch import scratch
from ..state.dtypes import as_numpy, dtype_name, storage_dtype, to_torch
from ..state.layout import Fragment
from .codec import CRC_BYTES, ChunkCodec, checksum_ok
from .grid import chunk_key, chunks_in
from .metadata import CheckpointMeta, read_metadata
from .save_plan import ArrayPlan, ChunkRead, ShardRead, chunk_reads
from .shard import IndexProblem, is_empty, read_index
from .writer import DEFAULT_IO_THREADS


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint folder with its validated metadata."""

    path: Path
    meta: CheckpointMeta

    @staticmethod
    def open(path: Path | str) -> Checkpoint:
        path = Path(path)
        return Checkpoint(path, read_metadata(path))


@dataclass(frozen=True)
class ReadRequest:
    """Fill `out` (the fragment's local shape; numpy in storage dtype, or torch) from the saved tensor."""

    fragment: Fragment
    out: np.ndarray | torch.Tensor


class ChunkProblem(Exception):
    """A damaged chunk; the message names it."""


@dataclass(frozen=True)
class Checked:
    """The chunks some fragments need, all verified; `apply` copies them out.

    Verified uncompressed chunks stay mapped (page cache, no extra memory), so `apply` copies
    them without reading or checking them again; compressed ones are read and checked again.
    """

    checkpoint: Checkpoint
    reads: tuple[tuple[ArrayPlan, ShardRead], ...]
    mapped: tuple[list[tuple[ChunkRead, np.ndarray]] | None, ...] = ()  # per entry of `reads`

    def apply(
        self,
        outs: Mapping[str, np.ndarray | torch.Tensor],
        *,
        threads: int = DEFAULT_IO_THREADS,
        progress: bool = False,
    ) -> None:
        """Copy every checked chunk into `outs[name]`, the requesting fragment's local data."""
        codec = ChunkCodec.parse(self.checkpoint.meta.compression)
        root = self.checkpoint.path

        def copy(i: int) -> None:
            array, shard_read = self.reads[i]
            out = outs[array.name]
            held = self.mapped[i] if i < len(self.mapped) else None
            for read, chunk in held if held is not None else read_shard(root, codec, array, shard_read):
                origin = array.chunk_box(read.index).offsets
                for overlap, dest in read.targets:
                    _copy(out[(*dest, ...)], chunk[(*overlap.slices(origin), ...)], dtype=array.dtype)

        problems = _problems(_run(list(range(len(self.reads))), copy, threads=threads, progress=progress, desc="load"))
        if problems:
            # Only a file changed between the two passes gets here.
            raise CheckpointError(
                f"checkpoint {root} changed while loading; targets are partly written:\n{join_problems(problems)}"
            )


def check(
    checkpoint: Checkpoint, fragments: Sequence[Fragment], *, threads: int = DEFAULT_IO_THREADS, progress: bool = False
) -> Checked:
    """Verify every chunk the fragments overlap; all problems are raised together."""
    codec = ChunkCodec.parse(checkpoint.meta.compression)
    problems: list[str] = []
    reads: list[tuple[ArrayPlan, ShardRead]] = []
    for fragment in fragments:
        name = fragment.layout.name
        array = checkpoint.meta.arrays.get(name)
        if array is None:
            problems.append(f"tensor {name!r} is not in the checkpoint")
            continue
        problems += check_array(checkpoint.path, array)
        reads += [(array, read) for read in chunk_reads(array, fragment)]
    results: list = []
    if not problems:
        hold = not codec.compressed and sum(len(r.chunks) for _, r in reads) <= _MAX_HELD_MAPS
        results = _run(
            reads,
            lambda job: _checked(checkpoint.path, codec, *job, hold=hold),
            threads=threads,
            progress=progress,
            desc="check",
        )
        problems = _problems(results)
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} (step {checkpoint.meta.step}) cannot be loaded:\n{join_problems(problems)}\n"
            f"load an earlier checkpoint; `resurgo-ckpt verify {checkpoint.path}` lists every problem"
        )
    return Checked(checkpoint, tuple(reads), tuple(results))


def read_fragments(
    checkpoint: Checkpoint,
    requests: Sequence[ReadRequest],
    *,
    threads: int = DEFAULT_IO_THREADS,
    progress: bool = False,
) -> None:
    """Fill every request's buffer, only after every chunk it needs was checked."""
    checked = check(checkpoint, [r.fragment for r in requests], threads=threads, progress=progress)
    checked.apply({r.fragment.layout.name: r.out for r in requests}, threads=threads)


def verify(checkpoint: Checkpoint, *, threads: int = DEFAULT_IO_THREADS, progress: bool = False) -> list[str]:
    """Every problem with the checkpoint: missing arrays or chunks, wrong sizes, bad checksums."""
    codec = ChunkCodec.parse(checkpoint.meta.compression)
    problems, jobs = [], []
    for array in checkpoint.meta.arrays.values():
        problems += check_array(checkpoint.path, array)
        jobs += [(array, whole_shard(array, shard)) for shard in array.shard_indices()]
    return problems + _problems(
        _run(
            jobs, lambda job: _checked(checkpoint.path, codec, *job), threads=threads, progress=progress, desc="verify"
        )
    )


def check_array(root: Path, array: ArrayPlan) -> list[str]:
    """The array's zarr document exists and agrees with the checkpoint's metadata."""
    doc = root / array.path / "zarr.json"
    try:
        fd = open_inside(root, doc)
        try:
            data = json.loads(os.read(fd, os.fstat(fd).st_size + 1))
        finally:
            os.close(fd)
    except FileNotFoundError:
        return [f"tensor {array.name!r}: array {array.path!r} is missing (no {doc})"]
    except (OSError, ValueError) as e:
        return [f"tensor {array.name!r}: cannot read {doc}: {e}"]
    try:
        shape = tuple(data["shape"])
        shards = tuple(data["chunk_grid"]["configuration"]["chunk_shape"])
        chunks = tuple(data["codecs"][0]["configuration"]["chunk_shape"])
    except (KeyError, TypeError, IndexError):
        return [f"tensor {array.name!r}: {doc} is malformed"]
    if (shape, shards, chunks) != (array.shape, array.shards, array.chunks):
        return [
            f"tensor {array.name!r}: {doc} says shape {shape} shards {shards} chunks {chunks}, "
            f"the checkpoint's metadata {array.shape} {array.shards} {array.chunks}"
        ]
    return []


def read_shard(
    root: Path, codec: ChunkCodec, array: ArrayPlan, shard_read: ShardRead
) -> Iterator[tuple[ChunkRead, np.ndarray]]:
    """Each requested chunk of one shard file, checked and decoded at full chunk shape (read-only,
    valid until the next one: a compressed chunk decodes into this thread's scratch memory).

    Chunks are mapped rather than read: checking and copying straight from the page cache avoids
    a kernel-to-user copy per pass.
    """
    path = root / array.path / chunk_key(shard_read.shard)
    what = f"tensor {array.name!r} shard {chunk_key(shard_read.shard)}"
    try:
        fd = open_inside(root, path)
    except FileNotFoundError:
        raise ChunkProblem(f"{what} is missing ({path})") from None
    except OSError as e:
        raise ChunkProblem(f"{what}: {e}") from None
    try:
        size = os.fstat(fd).st_size
        index = read_index(fd, size=size, shape=array.shard_shape)
        for read in shard_read.chunks:
            entry = index[array.shard_shape.locate(read.index)[1]]
            yield read, _map_chunk(fd, codec, array, entry, what=f"{what} chunk {read.index}")
    except IndexProblem as e:
        raise ChunkProblem(f"{what} {e}") from None
    except OSError as e:
        raise ChunkProblem(f"{what}: {e}") from None
    finally:
        os.close(fd)


def open_inside(root: Path, path: Path) -> int:
    """A read-only descriptor of `path`, a regular file inside the checkpoint folder `root`: a symlink
    out of it or anything but a file (a FIFO would block a reader forever) is refused with OSError."""
    real, target = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real, target]) != real:
        raise OSError(
            f"{path} resolves to {target}, outside the checkpoint folder (a symlink): do not load this checkpoint"
        )
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file: the checkpoint is damaged or was tampered with")
    return fd


def whole_shard(array: ArrayPlan, shard: tuple[int, ...]) -> ShardRead:
    """A read of every chunk of `shard` inside the tensor, going nowhere (for checking)."""
    box = array.shard_box(shard)
    return ShardRead(shard, tuple(ChunkRead(i, ()) for i in chunks_in(box, chunks=array.chunks)))


def _map_chunk(fd: int, codec: ChunkCodec, array: ArrayPlan, entry: np.ndarray, *, what: str) -> np.ndarray:
    if is_empty(entry):
        raise ChunkProblem(f"{what} is missing from its shard")
    offset, nbytes = int(entry[0]), int(entry[1])
    expected = array.chunk_nbytes + CRC_BYTES
    if (not codec.compressed and nbytes != expected) or nbytes < CRC_BYTES:
        raise ChunkProblem(f"{what} is {nbytes} bytes, expected {expected}")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    blob = memoryview(
        mmap.mmap(fd, offset - start + nbytes, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | _POPULATE, offset=start)
    )
    blob = blob[offset - start :]
    body, crc = blob[:-CRC_BYTES], blob[-CRC_BYTES:]
    if not checksum_ok(body, crc):
        raise ChunkProblem(f"{what} fails its crc32c checksum (corrupted)")
    try:
        raw = codec.decode(body, nbytes=array.chunk_nbytes, out=scratch(array.chunk_nbytes, slot=1))
    except Exception as e:  # a decompressor's error type is its own
        raise ChunkProblem(f"{what} does not decompress: {e}") from None
    return np.frombuffer(raw, dtype=storage_dtype(array.dtype)).reshape(array.chunks)


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault the whole chunk in at once


_MAX_HELD_MAPS = 16384  # well under the kernel's default limit of 65530 mappings per process


def _checked(
    root: Path, codec: ChunkCodec, array: ArrayPlan, shard_read: ShardRead, *, hold: bool = False
) -> list[tuple[ChunkRead, np.ndarray]] | None:
    """Check a shard's requested chunks; with `hold`, keep them mapped for copying later."""
    chunks = [(read, chunk) for read, chunk in read_shard(root, codec, array, shard_read)] if hold else None
    if not hold:
        for _ in read_shard(root, codec, array, shard_read):
            pass
    return chunks


def _copy(dst: np.ndarray | torch.Tensor, src: np.ndarray, *, dtype: str) -> None:
    """dst[...] = src, converting dtype (and device) where the target differs from storage."""
    if isinstance(dst, np.ndarray):
        copy_into(dst, src)
    elif dst.device.type == "cpu" and dtype_name(dst.dtype) == dtype:
        copy_into(as_numpy(dst), src)
    else:
        dst.copy_(to_torch(np.array(src), dtype))


def _run(jobs: list, fn: Callable[[Any], Any], *, threads: int, progress: bool, desc: str) -> list[Any]:
    """fn over jobs on a thread pool; a ChunkProblem becomes its message in the results."""

    def guarded(job: Any) -> Any:
        try:
            return fn(job)
        except ChunkProblem as e:
            return e

    with (
        tqdm(total=len(jobs), unit="chunk", desc=desc, disable=not progress) as bar,
        ThreadPoolExecutor(max(1, threads)) as pool,
    ):
        results = []
        for result in pool.map(guarded, jobs):
            results.append(result)
            bar.update()
    return results


def _problems(results: list[Any]) -> list[str]:
    return [str(r) for r in results if isinstance(r, ChunkProblem)]
