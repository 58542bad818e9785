"""The trainer's side of CheckFree: which gradient norms weigh a rebuild, and stage failures simulated
in the training process (`fault.simulate.mode=drop`) to measure what rebuilds cost in loss."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from resurgo.checkpoint import FaultConfig, SimulateConfig
from resurgo.parallel.checkfree import Rebuilt
from resurgo.parallel.clip import GradNorms


def rebuild_norms(norms: GradNorms) -> list[float]:
    """The per-stage norms a rebuild weighs the neighbours by: after clipping, as the reference does.

    Here one global norm is clipped, so every stage's gradient is scaled by the same factor and the
    neighbours' ratio, hence the weights, differ from the unclipped ones only through the 1e-4 added
    to each norm (the reference clips each stage on its own, which makes early rebuilds plain averages).
    """
    return list(norms.clipped)


def rebuild_message(rebuilt: Rebuilt, *, step: int, fault: FaultConfig) -> str:
    """One log line: which stage, from which neighbours with which weights, and the learning rate after."""
    if rebuilt.prev == rebuilt.next:
        return f"after step {step}, {rebuilt.describe()}, its optimizer state too"
    decay = fault.checkfree_lr_decay_steps
    boost = f"decaying to x1 over {decay} steps" if decay else "from now on"
    return (
        f"after step {step}, {rebuilt.describe()} (norms {rebuilt.norm_prev:.4g}, {rebuilt.norm_next:.4g}); "
        f"fresh optimizer state, learning rate x{fault.checkfree_lr_scale:g} {boost}"
    )


class FailureSimulator:
    """Draws which stages fail after each step: seeded by (seed, step) alone, so every rank, on any
    topology with as many stages, draws the same; plus the fixed failures of `at`."""

    def __init__(self, cfg: SimulateConfig, *, n_stages: int, record: Path | None = None) -> None:
        self.cfg, self.n_stages = cfg, n_stages
        self.record = record  # crash and kill: the steps whose failures happened, kept across the restarts they cause
        self.happened_through = self._read_record()  # read once, at start: other ranks write it as they fail
        self.forced = cfg.forced()
        self.failures = 0  # stages dropped and rebuilt since this process started
        self.skipped = 0  # draws CheckFree refused (an edge stage, adjacent stages), not simulated

    def draw(self, step: int) -> list[int]:
        """The stages that fail after optimizer step `step` (as logged: 1 is the first)."""
        lost = set(self.forced.get(step, []))
        if self.cfg.stage_failure_rate > 0:
            rng = random.Random(f"checkfree-simulate:{self.cfg.seed}:{step}")
            draws = [rng.random() for _ in range(self.n_stages)]
            lost |= {stage for stage, u in enumerate(draws) if u < self.cfg.stage_failure_rate}
        return sorted(lost)

    def _read_record(self) -> int:
        """The newest step whose simulated failure already happened in an earlier attempt (-1: none): a
        run that resumes from an earlier step must not fail the same stage again when it passes it."""
        try:
            return int(json.loads(self.record.read_text())["killed_through"]) if self.record else -1
        except (OSError, ValueError, KeyError):
            return -1

    def note_kill(self, step: int) -> None:
        """Every rank writes the same, each through its own temporary file, so any one rename wins whole."""
        assert self.record is not None
        self.record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_name(f".{self.record.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"killed_through": step}))
        os.replace(tmp, self.record)

    def metrics(self) -> dict[str, float]:
        return {"checkfree_failures": self.failures, "checkfree_skipped": self.skipped}


@torch.no_grad()
def destroy_stage_(module: nn.Module, optimizer: torch.optim.Optimizer, *, seed: int) -> None:
    """What losing a stage leaves: its parameters and optimizer state overwritten with noise (finite, so
    that only a missing rebuild, not a NaN, shows in the loss). Seeded, and apart from the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    tensors = list(module.parameters())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor.data
        noise = torch.randn(local.shape, generator=generator, dtype=torch.float32).abs()
        local.copy_(noise.to(device=local.device, dtype=local.dtype))
