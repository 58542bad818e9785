"""`optim.offload.*`: where the optimizer's fp32 master weights and Adam moments live, and where each
subgroup of them is updated. Checked at start so that a bad value fails before any state is built."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

OFFLOAD_MODES = ("none", "cpu", "auto")
CPU_IMPLS = ("auto", "torch", "deepspeed")
STATE_BYTES_PER_PARAM = 16  # host bytes per parameter: fp32 master, two moments, the gradient's host copy


@dataclass
class OffloadConfig:
    """Optimizer-state offloading.

    mode: 'none' keeps the optimizer as it is (state on the device); 'cpu' keeps the state in host
    memory and updates it on the CPU (a fixed `device_fraction` of subgroups on the device); 'auto'
    lets a performance model, measured at start, choose per step how many subgroups the device updates.
    subgroup_mb: fp32 master weights per subgroup, in MiB; the unit of transfer and of scheduling
    (a parameter is never split, so one larger than this forms a subgroup of its own).
    device_fraction: -1 lets the model decide ('auto') or means none ('cpu'); 0..1 fixes the share
    of subgroups updated on the device.
    cpu_impl: the CPU update: 'torch' (fused AdamW on CPU tensors), 'deepspeed' (DeepSpeedCPUAdam,
    needs DeepSpeed installed), 'auto' (the fastest installed one, measured at start).
    """

    mode: str = "none"
    subgroup_mb: float = 64.0
    device_fraction: float = -1.0
    cpu_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in OFFLOAD_MODES:
            raise ValueError(f"optim.offload.mode={self.mode!r}: choose one of {OFFLOAD_MODES}")
        if self.cpu_impl not in CPU_IMPLS:
            raise ValueError(f"optim.offload.cpu_impl={self.cpu_impl!r}: choose one of {CPU_IMPLS}")
        if not self.subgroup_mb > 0:
            raise ValueError(f"optim.offload.subgroup_mb={self.subgroup_mb}: give a positive size in MiB, e.g. 64")
        if self.device_fraction != -1 and not 0.0 <= self.device_fraction <= 1.0:
            raise ValueError(
                f"optim.offload.device_fraction={self.device_fraction}: give -1 (the model decides) or a share in [0, 1]"
            )
        if not self.enabled:
            return
        need = self.subgroup_mb * 2**20 / 4 * STATE_BYTES_PER_PARAM
        have = host_memory_bytes()
        if need > have:
            raise ValueError(
                f"optim.offload.subgroup_mb={self.subgroup_mb}: one subgroup needs {need / 2**30:.1f} GiB of host "
                f"memory but this machine has {have / 2**30:.1f} GiB; choose a smaller optim.offload.subgroup_mb"
            )
        if self.cpu_impl == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                "optim.offload.cpu_impl=deepspeed needs DeepSpeed (pip install deepspeed); "
                "or choose optim.offload.cpu_impl=torch"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def subgroup_numel(self) -> int:
        """fp32 elements per subgroup."""
        return max(1, int(self.subgroup_mb * 2**20) // 4)


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
