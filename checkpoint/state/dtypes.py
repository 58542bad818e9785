"""Torch dtypes and the numpy dtypes their bytes are stored as.

numpy has no bfloat16 or float8, so those are stored bit-for-bit as unsigned integers of the same
width; the array's attributes name the real dtype, so a plain zarr reader can still reinterpret them.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CheckpointError

_NATIVE = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "|i1",
    "uint8": "|u1",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "bool": "|b1",
    "complex64": "<c8",
    "complex128": "<c16",
}
_BITS = {
    "bfloat16": ("<u2", torch.uint16),
    "float8_e4m3fn": ("|u1", torch.uint8),
    "float8_e5m2": ("|u1", torch.uint8),
    "float8_e4m3fnuz": ("|u1", torch.uint8),
    "float8_e5m2fnuz": ("|u1", torch.uint8),
}


def dtype_name(dtype: torch.dtype) -> str:
    """The name a torch dtype is stored under ('bfloat16')."""
    return str(dtype).removeprefix("torch.")


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype whose bytes equal the torch dtype's."""
    if dtype in _NATIVE:
        return np.dtype(_NATIVE[dtype])
    if dtype in _BITS:
        return np.dtype(_BITS[dtype][0])
    raise CheckpointError(f"dtype {dtype!r} cannot be stored: supported are {sorted(_NATIVE) + sorted(_BITS)}")


def torch_dtype(dtype: str) -> torch.dtype:
    storage_dtype(dtype)
    return getattr(torch, dtype)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's bytes (no copy), whatever its dtype."""
    name = dtype_name(tensor.dtype)
    if name in _BITS:
        tensor = tensor.view(_BITS[name][1])
    return tensor.detach().numpy()


def is_floating(dtype: str) -> bool:
    return torch_dtype(dtype).is_floating_point


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A torch view of stored bytes (no copy) as the torch dtype they hold."""
    tensor = torch.from_numpy(array)
    return tensor.view(torch_dtype(dtype)) if dtype in _BITS else tensor
