"""A chunk's bytes on disk: raw little-endian values, optionally compressed, then a crc32c.

This is exactly zarr v3's codec chain [bytes(little), <compressor>?, crc32c], so plain zarr reads
what the checkpoint writes, while the checkpoint writes and verifies chunk files itself (no extra
copies, precise errors, any thread pool).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import crc32c
import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ZstdCodec

from ..errors import CheckpointError
from ..scratch import contiguous_runs, scratch

COMPRESSIONS = ("none", "zstd", "lz4", "gzip")
CRC_BYTES = 4


@dataclass(frozen=True)
class ChunkCodec:
    """Compression spelled as 'none', 'zstd[:level]', 'lz4[:level]' (blosc) or 'gzip[:level]'."""

    name: str = "none"
    level: int = 0

    @staticmethod
    def parse(spec: str) -> ChunkCodec:
        m = re.fullmatch(r"([a-z0-9]+)(?::(-?\d+))?", spec.strip().lower())
        if not m or m.group(1) not in COMPRESSIONS:
            raise CheckpointError(
                f"checkpoint.compression={spec!r} is not known: choose one of {COMPRESSIONS}, "
                "optionally with a level such as 'zstd:3'"
            )
        name = m.group(1)
        default = {"none": 0, "zstd": 3, "lz4": 5, "gzip": 5}[name]
        return ChunkCodec(name, int(m.group(2)) if m.group(2) else default)

    @property
    def spec(self) -> str:
        return "none" if self.name == "none" else f"{self.name}:{self.level}"

    @property
    def compressed(self) -> bool:
        return self.name != "none"

    def zarr_codecs(self, *, itemsize: int) -> dict[str, Any]:
        """Arguments for `zarr.create_array` that describe this chain."""
        compressor = {
            "none": [],
            "zstd": [ZstdCodec(level=self.level)],
            "lz4": [BloscCodec(cname="lz4", clevel=self.level, shuffle="shuffle", typesize=itemsize)],
            "gzip": [GzipCodec(level=self.level)],
        }[self.name]
        return {"serializer": BytesCodec(endian="little"), "compressors": [*compressor, Crc32cCodec()]}

    def encode(self, data: np.ndarray) -> Sequence[bytes | memoryview]:
        """The buffers to write for a chunk at full chunk shape; uncompressed data is not copied
        (a strided chunk is written as its contiguous runs)."""
        runs = contiguous_runs(data) if not self.compressed else None
        if runs is None:
            if not data.flags.c_contiguous:
                packed = scratch(data.nbytes).view(data.dtype).reshape(data.shape)
                np.copyto(packed, data)
                data = packed
            raw = memoryview(data.reshape(-1).view(np.uint8))
            runs = [raw if not self.compressed else memoryview(self._numcodec().encode(data))]
        value = 0
        for run in runs:
            value = crc32c.crc32c(run, value)
        return [*runs, value.to_bytes(CRC_BYTES, "little")]

    def decode(self, body: memoryview, *, nbytes: int, out: np.ndarray) -> memoryview | np.ndarray:
        """The raw bytes of a stored chunk body (checksum already verified and removed); a
        compressed body is decoded into `out` (uint8, `nbytes` long)."""
        if not self.compressed:
            return body
        raw = np.asarray(self._numcodec().decode(body, out=out)).reshape(-1).view(np.uint8)
        if raw.nbytes != nbytes:
            raise ValueError(f"decompressed to {raw.nbytes} bytes, expected {nbytes}")
        return raw

    def _numcodec(self) -> numcodecs.abc.Codec:
        if self.name == "zstd":
            return numcodecs.Zstd(level=self.level)
        if self.name == "gzip":
            return numcodecs.GZip(level=self.level)
        return numcodecs.Blosc(cname="lz4", clevel=self.level, shuffle=numcodecs.Blosc.SHUFFLE)


def checksum_ok(body: memoryview | list[memoryview], stored: bytes | memoryview) -> bool:
    """Whether the crc32c of `body` (or of its parts, in order) equals the stored one."""
    value = 0
    for part in body if isinstance(body, list) else [body]:
        value = crc32c.crc32c(part, value)
    return value.to_bytes(CRC_BYTES, "little") == bytes(stored)
