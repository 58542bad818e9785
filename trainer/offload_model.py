"""How long one offloaded optimizer step takes for a given split of subgroups between CPU and device,
from costs measured at start on this machine, and the split that minimises it.

A subgroup updated on the CPU moves its gradient to the host and its updated parameters back; one
updated on the device moves its fp32 master and moments (12 bytes per parameter) in and out. With a
real device the CPU, the device and each direction of the link work at once, so the step takes as
long as the busiest of them plus the pipeline's fill and drain; when the "device" is the CPU itself
all of it runs on the same cores, one after the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

STATE_BYTES = 12  # fp32 master + two moments per parameter, each way on the device path
STAGING_BYTES = 16  # per parameter of a staging buffer: master, moments, an fp32 gradient
STAGING_BUFFERS = 2


@dataclass(frozen=True)
class Costs:
    """Rates in elements or bytes per second; `shared` when the device is the CPU itself."""

    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    cpu_elems_per_s: float
    device_elems_per_s: float
    free_device_bytes: float
    shared: bool
    grad_bytes: int = 4  # per element of a gradient leaving the device
    param_bytes: int = 4  # per element of a parameter returning to it


def step_time(sizes: Sequence[int], on_device: Sequence[bool], costs: Costs) -> float:
    """Modelled seconds of one optimizer step."""
    dev = sum(n for n, d in zip(sizes, on_device) if d)
    cpu = sum(sizes) - dev
    t_cpu = cpu / costs.cpu_elems_per_s
    t_dev = dev / costs.device_elems_per_s
    t_h2d = (STATE_BYTES * dev + costs.param_bytes * cpu) / costs.h2d_bytes_per_s
    t_d2h = (STATE_BYTES * dev + costs.grad_bytes * cpu) / costs.d2h_bytes_per_s
    if costs.shared:
        return t_cpu + t_dev + t_h2d + t_d2h
    largest_dev = max((n for n, d in zip(sizes, on_device) if d), default=0)
    largest_cpu = max((n for n, d in zip(sizes, on_device) if not d), default=0)
    dev_edges = STATE_BYTES * largest_dev * (1 / costs.h2d_bytes_per_s + 1 / costs.d2h_bytes_per_s)
    cpu_edges = largest_cpu * (costs.grad_bytes / costs.d2h_bytes_per_s + costs.param_bytes / costs.h2d_bytes_per_s)
    return max(t_cpu + cpu_edges, t_dev + dev_edges, t_h2d, t_d2h)


def spread(n: int, k: int) -> list[bool]:
    """`k` of `n` subgroups on the device, evenly spaced so that CPU work lies between any two of them
    and hides their transfers."""
    return [(i * k) // n != ((i + 1) * k) // n for i in range(n)]


def fits_staging(sizes: Sequence[int], free_device_bytes: float) -> bool:
    return STAGING_BUFFERS * STAGING_BYTES * max(sizes, default=0) <= 0.9 * free_device_bytes


@dataclass(frozen=True)
class Plan:
    on_device: list[bool]
    modelled_s: float

    @property
    def device_count(self) -> int:
        return sum(self.on_device)


EXHAUSTIVE_UP_TO = 12  # subgroups: every subset is tried up to here (4096 layouts), else every count


def choose(sizes: Sequence[int], costs: Costs, *, fraction: float = -1.0) -> Plan:
    """The split: `fraction` of the subgroups when given (>= 0), else the modelled fastest (the fewest
    on the device among equals), none when the device is the CPU or the staging buffers do not fit. A few subgroups are
    searched exhaustively; many are nearly all of one size, where only their count matters."""
    n = len(sizes)
    if fraction >= 0:
        layout = spread(n, round(fraction * n))
        return Plan(layout, step_time(sizes, layout, costs))
    best = Plan(spread(n, 0), step_time(sizes, spread(n, 0), costs))
    if costs.shared or not fits_staging(sizes, costs.free_device_bytes):
        return best  # the device is the CPU itself (moving a subgroup only adds copies), or too full
    if n <= EXHAUSTIVE_UP_TO:
        layouts = ([bool(mask >> i & 1) for i in range(n)] for mask in sorted(range(1, 2**n), key=int.bit_count))
    else:
        layouts = (spread(n, k) for k in range(1, n + 1))
    for layout in layouts:
        t = step_time(sizes, layout, costs)
        if t < best.modelled_s * (1 - 1e-9):
            best = Plan(layout, t)
    return best


# ---- measurement ------------------------------------------------------------------------------


def _best_time(fn: Callable[[], None], *, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def copy_rate(src: torch.Tensor, dst: torch.Tensor, *, device: torch.device) -> float:
    """Bytes per second of `dst.copy_(src)`."""
    return src.numel() * src.element_size() / _best_time(lambda: dst.copy_(src, non_blocking=True), device=device)


def update_rate(update: Callable[..., None], *, numel: int, device: torch.device) -> float:
    """Elements per second of one AdamW implementation `update(params, grads, exp_avgs, exp_avg_sqs, steps)`,
    on a subgroup of `numel` elements split into a few tensors as a model's would be."""
    parts = 8
    size = max(1, numel // parts)
    make = lambda: [torch.randn(size, device=device) for _ in range(parts)]  # noqa: E731
    params, grads, m, v = make(), make(), make(), [t.abs() for t in make()]
    steps = [torch.zeros((), device=device) for _ in range(parts)]
    return size * parts / _best_time(lambda: update(params, grads, m, v, steps), device=device)


def measure(
    *,
    device: torch.device,
    numel: int,
    cpu_update: Callable[..., None],
    device_update: Callable[..., None],
    pin: bool,
) -> Costs:
    """The costs on this machine, on buffers of one subgroup (capped at 16M elements to keep start short)."""
    numel = max(1024, min(numel, 16 * 2**20))
    host = torch.empty(numel, pin_memory=pin)
    dev = torch.empty(numel, device=device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        from .offload_config import host_memory_bytes

        free = host_memory_bytes()
    return Costs(
        h2d_bytes_per_s=copy_rate(host, dev, device=device),
        d2h_bytes_per_s=copy_rate(dev, host, device=device),
        cpu_elems_per_s=update_rate(cpu_update, numel=numel, device=torch.device("cpu")),
        device_elems_per_s=update_rate(device_update, numel=numel, device=device),
        free_device_bytes=float(free),
        shared=device.type == "cpu",
    )
