"""Where a node's shares of parity rows 1..m-1 are scaled: on the parity holder's CPU, or on the GPU
by the worker before the copy to host.

Parity 0 is the XOR of the data, so a node's share of it is its snapshot bytes as they are: nothing
to compute anywhere. Every other row's share is the data times a GF(2^8) coefficient. Scaled on the
host, the holder multiplies each piece as it adds it (a multiply-accumulate instead of an XOR); scaled
on the device, the worker runs the Triton kernel on the tensors still on the GPU and copies the m-1
scaled shares to host beside the snapshot, and the holder only XORs them. Per byte of snapshot and
row, the host costs 1/mac; the device 1/kernel + 1/d2h (the extra copy) + 1/xor (still added), and
m-1 snapshots of host memory per slot. The rates are measured here, on the machine that will code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from . import code as erasure

log = logging.getLogger(__name__)

Site = Literal["host", "device"]
SETTINGS = ("auto", "host", "device")
PROBE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class CodingRates:
    """Bytes per second of each step a scaled share takes; device rates are None without a GPU."""

    host_mac: float  # the holder's multiply-accumulate of one row
    host_xor: float  # the holder's plain accumulate (what a pre-scaled share still needs)
    d2h: float | None = None  # device-to-host copy into pinned memory
    device_scale: float | None = None  # the Triton kernel, one row

    def describe(self) -> str:
        gb = lambda r: f"{r / 1e9:.1f}" if r else "-"  # noqa: E731
        return (
            f"host multiply-accumulate {gb(self.host_mac)} GB/s, XOR {gb(self.host_xor)} GB/s; "
            f"device scale {gb(self.device_scale)} GB/s, copy to host {gb(self.d2h)} GB/s"
        )


def choose_site(setting: str, *, m: int, rates: CodingRates | None) -> tuple[Site, str]:
    """The site for a code with m parities, and why (`setting`: auto, host or device)."""
    if setting not in SETTINGS:
        raise ValueError(f"fault.erasure.encode={setting!r} must be one of {', '.join(SETTINGS)}")
    if m < 2:
        return "host", "m=1: the only parity is the XOR of the data, whose shares are the snapshot bytes as they are"
    if setting != "auto":
        return setting, f"fault.erasure.encode={setting}"  # type: ignore[return-value]
    if rates is None or rates.d2h is None or rates.device_scale is None:
        measured = f" ({rates.describe()})" if rates is not None else ""
        return "host", f"no GPU: the holders scale the shares they receive{measured}"
    host = 1 / rates.host_mac
    device = 1 / rates.device_scale + 1 / rates.d2h + 1 / rates.host_xor
    site: Site = "device" if device < host else "host"
    return site, (
        f"{rates.describe()}: per byte and parity row, host {host * 1e9:.3f} ns against device "
        f"{device * 1e9:.3f} ns (which also holds {m - 1} scaled copies per snapshot in host memory)"
    )


def measure_rates(device: torch.device | None, *, nbytes: int = PROBE_BYTES) -> CodingRates:
    """The rates `choose_site` weighs, timed on `nbytes` here (a few milliseconds; the kernel's first
    call, which compiles it, is not timed)."""
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    acc = np.empty_like(data)
    erasure.accumulate(acc, data, k=2, m=2, parity=0, index=0, store=True)
    xor = _rate(nbytes, lambda: erasure.accumulate(acc, data, k=2, m=2, parity=0, index=1))
    mac = _rate(nbytes, lambda: erasure.accumulate(acc, data, k=2, m=2, parity=1, index=1))
    if device is None or device.type != "cuda":
        return CodingRates(host_mac=mac, host_xor=xor)
    src = torch.from_numpy(data).to(device)
    out = [torch.empty_like(src)]
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    erasure.scale(src[:4096], [3], out=[out[0][:4096]])  # compiles the kernel
    scale = _rate(nbytes, lambda: erasure.scale(src, [3], out=out), sync=device)
    d2h = _rate(nbytes, lambda: pinned.copy_(src, non_blocking=True), sync=device)
    return CodingRates(host_mac=mac, host_xor=xor, d2h=d2h, device_scale=scale)


def _rate(nbytes: int, work: Callable[[], object], *, sync: torch.device | None = None, repeat: int = 3) -> float:
    """Bytes per second of the best of `repeat` runs of `work`."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        if sync is not None:
            torch.cuda.synchronize(sync)
        best = min(best, time.perf_counter() - start)
    return nbytes / max(best, 1e-9)


def decide_site(setting: str, *, m: int, device: torch.device | None) -> tuple[Site, str]:
    """`choose_site` with rates measured here when they can change the answer."""
    needs_rates = setting == "auto" and m >= 2 and device is not None and device.type == "cuda"
    return choose_site(setting, m=m, rates=measure_rates(device) if needs_rates else None)
