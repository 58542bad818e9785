"""Per-step records: one printed line on rank 0, the same record in a JSONL file, TensorBoard if present."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s by device-name fragment, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}

# Numbers other components add to a record that are worth a place on the printed line.
SHORT_LABELS = {"snapshot_fence_ms": "fence ms", "snapshot_age": "snap age", "persist_backlog": "backlog"}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Writes records on rank 0 only; other ranks hold a logger that does nothing."""

    def __init__(
        self, *, run_dir: Path, enabled: bool, total_steps: int, flops_per_token: float, device: torch.device
    ) -> None:
        self.enabled, self.total_steps, self.device = enabled, total_steps, device
        self.flops_per_token, self.peak = flops_per_token, peak_flops(device)
        self.interactive = enabled and sys.stdout.isatty()
        self._file = None
        self._tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = (run_dir / "metrics.jsonl").open("a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = dict(record)
        record["peak_mem_gib"] = round(peak_memory_gib(self.device), 3)
        if self.peak:
            record["mfu"] = round(record["tokens_per_s"] * self.flops_per_token / self.peak, 4)
        record["time"] = time.time()
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])
        line = self.format(record)
        end = "\r" if self.interactive and record["step"] < self.total_steps else "\n"
        print(line, end=end, flush=True)

    def format(self, record: dict[str, Any]) -> str:
        parts = [
            f"step {record['step']:>6}/{self.total_steps}",
            f"loss {record['loss']:.4f}",
            f"lr {record['lr']:.2e}",
            f"gnorm {record['grad_norm']:.3f}",
            f"tok/s {record['tokens_per_s']:,.0f}",
            f"step {record['step_time_s'] * 1000:.0f}ms",
            f"mem {record['peak_mem_gib']:.2f}GiB",
        ]
        if "mfu" in record:
            parts.append(f"mfu {record['mfu']:.1%}")
        parts += [f"{label} {record[key]}" for key, label in SHORT_LABELS.items() if key in record]
        return " | ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
