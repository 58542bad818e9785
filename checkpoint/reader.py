"""Reading a checkpoint: only the chunks a fragment overlaps, each checked before it is used.

Loading is two passes over the same chunks. `check` reads every needed chunk and verifies that it
exists (zarr would silently return zeros for a missing one), has the right size and passes its
crc32c; `Checked.apply` then copies them to their destinations (re-checking each). So a damaged
checkpoint changes no target, without staging a rank's whole state in extra host memory: the
second pass reads from the page cache the first one filled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .codec import CRC_BYTES, ChunkCodec, checksum_ok
from .dtypes import as_numpy, storage_dtype, to_torch
from .errors import CheckpointError, join_problems
from .grid import chunk_key
from .layout import Fragment
from .metadata import CheckpointMeta, read_metadata
from .plan import ArrayPlan, ChunkRead, chunk_reads
from .scratch import scratch
from .store import DEFAULT_IO_THREADS


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
    """The chunks some fragments need, all verified; `apply` copies them out."""

    checkpoint: Checkpoint
    reads: tuple[tuple[ArrayPlan, ChunkRead], ...]

    def apply(self, outs: Mapping[str, np.ndarray | torch.Tensor], *, threads: int = DEFAULT_IO_THREADS, progress: bool = False) -> None:
        """Copy every checked chunk into `outs[name]`, the requesting fragment's local data."""
        codec = ChunkCodec.parse(self.checkpoint.meta.compression)
        root = self.checkpoint.path

        def copy(job: tuple[ArrayPlan, ChunkRead]) -> str | None:
            array, read = job
            out = outs[array.name]
            if _read_direct(root, codec, array, read, out):
                return None
            chunk = read_chunk(root, codec, array, read.index)
            origin = array.chunk_box(read.index).offsets
            for overlap, dest in read.targets:
                src = chunk[(*overlap.slices(origin), ...)]
                if isinstance(out, torch.Tensor):
                    out[(*dest, ...)].copy_(to_torch(src, array.dtype))
                else:
                    out[(*dest, ...)] = src
            return None

        problems = _problems(_run(list(self.reads), copy, threads=threads, progress=progress, desc="load"))
        if problems:
            # Only a file changed between the two passes gets here.
            raise CheckpointError(f"checkpoint {root} changed while loading; targets are partly written:\n{join_problems(problems)}")


def check(checkpoint: Checkpoint, fragments: Sequence[Fragment], *, threads: int = DEFAULT_IO_THREADS, progress: bool = False) -> Checked:
    """Verify every chunk the fragments overlap; all problems are raised together."""
    codec = ChunkCodec.parse(checkpoint.meta.compression)
    problems: list[str] = []
    reads: list[tuple[ArrayPlan, ChunkRead]] = []
    for fragment in fragments:
        name = fragment.layout.name
        array = checkpoint.meta.arrays.get(name)
        if array is None:
            problems.append(f"tensor {name!r} is not in the checkpoint")
            continue
        problems += check_array(checkpoint.path, array)
        reads += [(array, read) for read in chunk_reads(array, fragment)]
    if not problems:
        problems = _problems(_run(reads, lambda job: read_chunk(checkpoint.path, codec, job[0], job[1].index), threads=threads, progress=progress, desc="check"))
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} (step {checkpoint.meta.step}) cannot be loaded:\n{join_problems(problems)}\n"
            f"load an earlier checkpoint; `resurgo-ckpt verify {checkpoint.path}` lists every problem"
        )
    return Checked(checkpoint, tuple(reads))


def read_fragments(checkpoint: Checkpoint, requests: Sequence[ReadRequest], *, threads: int = DEFAULT_IO_THREADS, progress: bool = False) -> None:
    """Fill every request's buffer, only after every chunk it needs was checked."""
    checked = check(checkpoint, [r.fragment for r in requests], threads=threads, progress=progress)
    checked.apply({r.fragment.layout.name: r.out for r in requests}, threads=threads)


def verify(checkpoint: Checkpoint, *, threads: int = DEFAULT_IO_THREADS, progress: bool = False) -> list[str]:
    """Every problem with the checkpoint: missing arrays or chunks, wrong sizes, bad checksums."""
    codec = ChunkCodec.parse(checkpoint.meta.compression)
    problems, jobs = [], []
    for array in checkpoint.meta.arrays.values():
        problems += check_array(checkpoint.path, array)
        jobs += [(array, index) for index in array.chunk_indices()]
    return problems + _problems(_run(jobs, lambda job: read_chunk(checkpoint.path, codec, *job), threads=threads, progress=progress, desc="verify"))


def check_array(root: Path, array: ArrayPlan) -> list[str]:
    """The array's zarr document exists and agrees with the checkpoint's metadata."""
    doc = root / array.path / "zarr.json"
    try:
        data = json.loads(doc.read_text())
    except FileNotFoundError:
        return [f"tensor {array.name!r}: array {array.path!r} is missing (no {doc})"]
    except (OSError, ValueError) as e:
        return [f"tensor {array.name!r}: cannot read {doc}: {e}"]
    try:
        shape = tuple(data["shape"])
        chunks = tuple(data["chunk_grid"]["configuration"]["chunk_shape"])
    except (KeyError, TypeError):
        return [f"tensor {array.name!r}: {doc} is malformed"]
    if (shape, chunks) != (array.shape, array.chunks):
        return [f"tensor {array.name!r}: {doc} says shape {shape} chunks {chunks}, metadata {array.shape} {array.chunks}"]
    return []


def read_chunk(root: Path, codec: ChunkCodec, array: ArrayPlan, index: tuple[int, ...]) -> np.ndarray:
    """A stored chunk, checked and decoded at full chunk shape, in this thread's scratch memory
    (valid until the thread's next read)."""
    path = root / array.path / chunk_key(index)
    what = f"tensor {array.name!r} chunk {chunk_key(index)}"
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            _check_size(codec, array, size, what)
            blob = scratch(size)
            _read_exactly(f.fileno(), [memoryview(blob)], size, what)
    except FileNotFoundError:
        raise ChunkProblem(f"{what} is missing ({path})") from None
    except OSError as e:
        raise ChunkProblem(f"{what}: {e}") from None
    body, crc = memoryview(blob)[:-CRC_BYTES], memoryview(blob)[-CRC_BYTES:]
    if not checksum_ok(body, crc):
        raise ChunkProblem(f"{what} fails its crc32c checksum (corrupted)")
    try:
        raw = codec.decode(body, nbytes=array.chunk_nbytes, out=scratch(array.chunk_nbytes, slot=1))
    except Exception as e:  # a decompressor's error type is its own
        raise ChunkProblem(f"{what} does not decompress: {e}") from None
    return np.frombuffer(raw, dtype=storage_dtype(array.dtype)).reshape(array.chunks)


def _read_direct(root: Path, codec: ChunkCodec, array: ArrayPlan, read: ChunkRead, out: np.ndarray | torch.Tensor) -> bool:
    """Read a whole uncompressed chunk straight into a contiguous CPU destination; False if that does not apply."""
    if codec.compressed or len(read.targets) != 1:
        return False
    overlap, dest = read.targets[0]
    if overlap.sizes != array.chunks:
        return False
    view = out[(*dest, ...)]
    if isinstance(view, torch.Tensor):
        if view.device.type != "cpu" or str(view.dtype).removeprefix("torch.") != array.dtype or not view.is_contiguous():
            return False
        view = as_numpy(view)
    elif not view.flags.c_contiguous:
        return False
    path = root / array.path / chunk_key(read.index)
    what = f"tensor {array.name!r} chunk {chunk_key(read.index)}"
    body, crc = memoryview(view.reshape(-1).view(np.uint8)), scratch(CRC_BYTES)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ChunkProblem(f"{what}: {e}") from None
    try:
        size = os.fstat(fd).st_size
        _check_size(codec, array, size, what)
        _read_exactly(fd, [body, memoryview(crc)], size, what)
    except OSError as e:
        raise ChunkProblem(f"{what}: {e}") from None
    finally:
        os.close(fd)
    if not checksum_ok(body, crc):
        raise ChunkProblem(f"{what} fails its crc32c checksum (corrupted)")
    return True


def _check_size(codec: ChunkCodec, array: ArrayPlan, size: int, what: str) -> None:
    expected = array.chunk_nbytes + CRC_BYTES
    if (not codec.compressed and size != expected) or size < CRC_BYTES:
        raise ChunkProblem(f"{what} is {size} bytes, expected {expected} (truncated or overwritten)")


def _read_exactly(fd: int, buffers: list[memoryview], size: int, what: str) -> None:
    """preadv until `size` bytes landed in `buffers` (in order)."""
    done = 0
    while done < size:
        skip, views = done, []
        for b in buffers:
            if skip >= b.nbytes:
                skip -= b.nbytes
                continue
            views.append(b[skip:])
            skip = 0
        n = os.preadv(fd, views, done)
        if n == 0:
            raise ChunkProblem(f"{what} ended early (truncated while reading)")
        done += n


def _run(jobs: list, fn: Callable[[Any], Any], *, threads: int, progress: bool, desc: str) -> list[Any]:
    """fn over jobs on a thread pool; a ChunkProblem becomes its message in the results."""

    def guarded(job: Any) -> Any:
        try:
            return fn(job)
        except ChunkProblem as e:
            return e

    with tqdm(total=len(jobs), unit="chunk", desc=desc, disable=not progress) as bar, ThreadPoolExecutor(max(1, threads)) as pool:
        results = []
        for result in pool.map(guarded, jobs):
            results.append(result)
            bar.update()
    return results


def _problems(results: list[Any]) -> list[str]:
    return [str(r) for r in results if isinstance(r, ChunkProblem)]
