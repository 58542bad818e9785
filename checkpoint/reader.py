"""Reading a checkpoint: only the chunks a fragment overlaps, each checked before it is used.

Every chunk read is checked for existence (zarr would silently return zeros for a missing one),
size and crc32c. Chunks that land whole in a contiguous destination are read straight into it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .codec import CRC_BYTES, ChunkCodec, checksum_ok
from .dtypes import storage_dtype
from .errors import CheckpointError, join_problems
from .grid import chunk_key
from .layout import Fragment
from .metadata import CheckpointMeta, read_metadata
from .plan import ArrayPlan, ChunkRead, chunk_reads
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
    """Fill `out` (the fragment's local shape, storage dtype) from the saved tensor."""

    fragment: Fragment
    out: np.ndarray


class _ChunkProblem(Exception):
    """A damaged chunk; the message names it."""


def read_fragments(
    checkpoint: Checkpoint, requests: Sequence[ReadRequest], *, threads: int = DEFAULT_IO_THREADS, progress: bool = False
) -> None:
    """Fill every request's buffer; all problems are collected and raised together."""
    codec = ChunkCodec.parse(checkpoint.meta.compression)
    problems, jobs = [], []
    for request in requests:
        name = request.fragment.layout.name
        array = checkpoint.meta.arrays.get(name)
        if array is None:
            problems.append(f"tensor {name!r} is not in the checkpoint")
            continue
        problems += check_array(checkpoint.path, array)
        jobs += [(array, read, request.out) for read in chunk_reads(array, request.fragment)]
    if problems:
        raise _damaged(checkpoint, problems)
    results = _run(jobs, lambda job: _read_into(checkpoint.path, codec, *job), threads=threads, progress=progress, desc="load")
    problems = [r for r in results if r]
    if problems:
        raise _damaged(checkpoint, problems)


def verify(checkpoint: Checkpoint, *, threads: int = DEFAULT_IO_THREADS, progress: bool = False) -> list[str]:
    """Every problem with the checkpoint: missing arrays or chunks, wrong sizes, bad checksums."""
    codec = ChunkCodec.parse(checkpoint.meta.compression)
    problems = []
    jobs = []
    for array in checkpoint.meta.arrays.values():
        problems += check_array(checkpoint.path, array)
        jobs += [(array, index) for index in array.chunk_indices()]

    def check(job: tuple[ArrayPlan, tuple[int, ...]]) -> str | None:
        try:
            read_chunk(checkpoint.path, codec, *job)
        except _ChunkProblem as e:
            return str(e)
        return None

    results = _run(jobs, check, threads=threads, progress=progress, desc="verify")
    return problems + [r for r in results if r]


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
    """A stored chunk, checked and decoded, at full chunk shape."""
    path = root / array.path / chunk_key(index)
    what = f"tensor {array.name!r} chunk {chunk_key(index)}"
    try:
        with open(path, "rb") as f:
            blob = memoryview(f.read())
    except FileNotFoundError:
        raise _ChunkProblem(f"{what} is missing ({path})") from None
    except OSError as e:
        raise _ChunkProblem(f"{what}: {e}") from None
    expected = array.chunk_nbytes + CRC_BYTES
    if not codec.compressed and len(blob) != expected:
        raise _ChunkProblem(f"{what} is {len(blob)} bytes, expected {expected} (truncated or overwritten)")
    if len(blob) < CRC_BYTES or not checksum_ok(blob[:-CRC_BYTES], blob[-CRC_BYTES:]):
        raise _ChunkProblem(f"{what} fails its crc32c checksum (corrupted)")
    try:
        raw = codec.decode(blob[:-CRC_BYTES], nbytes=array.chunk_nbytes)
    except Exception as e:  # a decompressor's error type is its own
        raise _ChunkProblem(f"{what} does not decompress: {e}") from None
    return np.frombuffer(raw, dtype=storage_dtype(array.dtype)).reshape(array.chunks)


def _read_into(root: Path, codec: ChunkCodec, array: ArrayPlan, read: ChunkRead, out: np.ndarray) -> str | None:
    try:
        if not _read_direct(root, codec, array, read, out):
            chunk = read_chunk(root, codec, array, read.index)
            origin = array.chunk_box(read.index).offsets
            for overlap, dest in read.targets:
                out[dest] = chunk[overlap.slices(origin)]
    except _ChunkProblem as e:
        return str(e)
    return None


def _read_direct(root: Path, codec: ChunkCodec, array: ArrayPlan, read: ChunkRead, out: np.ndarray) -> bool:
    """Read a whole uncompressed chunk straight into its destination; False when that does not apply."""
    if codec.compressed or len(read.targets) != 1:
        return False
    overlap, dest = read.targets[0]
    view = out[(*dest, ...)]  # '...' keeps a 0-d result an array view, not a scalar copy
    if overlap.sizes != array.chunks or not view.flags.c_contiguous:
        return False
    path = root / array.path / chunk_key(read.index)
    what = f"tensor {array.name!r} chunk {chunk_key(read.index)}"
    body, crc = memoryview(view.reshape(-1).view(np.uint8)), bytearray(CRC_BYTES)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _ChunkProblem(f"{what} is missing ({path})") from None
    try:
        size = os.fstat(fd).st_size
        if size != body.nbytes + CRC_BYTES:
            raise _ChunkProblem(f"{what} is {size} bytes, expected {body.nbytes + CRC_BYTES} (truncated or overwritten)")
        done = 0
        while done < size:
            bufs = [body[done:], crc] if done < body.nbytes else [memoryview(crc)[done - body.nbytes :]]
            n = os.preadv(fd, bufs, done)
            if n == 0:
                raise _ChunkProblem(f"{what} ended early (truncated while reading)")
            done += n
    except OSError as e:
        raise _ChunkProblem(f"{what}: {e}") from None
    finally:
        os.close(fd)
    if not checksum_ok(body, crc):
        raise _ChunkProblem(f"{what} fails its crc32c checksum (corrupted)")
    return True


def _run(jobs: list, fn, *, threads: int, progress: bool, desc: str) -> list:
    with tqdm(total=len(jobs), unit="chunk", desc=desc, disable=not progress) as bar, ThreadPoolExecutor(max(1, threads)) as pool:
        results = []
        for result in pool.map(fn, jobs):
            results.append(result)
            bar.update()
    return results


def _damaged(checkpoint: Checkpoint, problems: list[str]) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {checkpoint.path} (step {checkpoint.meta.step}) cannot be loaded:\n{join_problems(problems)}\n"
        f"load an earlier checkpoint; `resurgo-ckpt verify {checkpoint.path}` lists every problem"
    )
