"""The trainer's part in losing pipeline stages (CheckFree): rebuilding lost stages from their
neighbours or swap partners, what recovery needs to do it after a restart, and stage failures
simulated on purpose. Mixed into `Trainer` (trainer.py), whose model, optimizers, mesh and progress
it works on."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.distributed.device_mesh import DeviceMesh

from resurgo.checkpoint import StageRebuild
from resurgo.parallel.checkfree import CheckFreeRefused, Rebuilt, check_topology, plan_rebuild, rebuild_stages
from resurgo.parallel.clip import GradNorms
from resurgo.parallel.parallelize import ModelParts
from resurgo.parallel.routing import swap_partner

from .checkfree import FailureSimulator, destroy_stage_, rebuild_message
from .config import JobConfig
from .distributed import DistEnv
from .optim import adam_state, reset_state_
from .state import TrainProgress

log = logging.getLogger(__name__)


class StageFailures:
    cfg: JobConfig
    env: DistEnv
    run_dir: Path
    mesh: DeviceMesh
    parts: ModelParts
    optimizers: list[torch.optim.Optimizer]
    progress: TrainProgress
    grad_norms: GradNorms | None
    simulator: FailureSimulator | None
    lose_memory: Callable[[], None] | None
    n_stages: int
    stage_ids: list[int]
    stage_layers: list[list[int]]

    def _build_simulator(self) -> FailureSimulator | None:
        """Stage failures on purpose (`fault.simulate`): dropped in this process, or its ranks killed."""
        sim = self.cfg.fault.simulate
        if not sim.active:
            return None
        try:
            check_topology(n_stages=self.n_stages, stages_per_rank=len(self.stage_ids))
        except CheckFreeRefused as e:
            raise ValueError(f"fault.simulate cannot rebuild what it drops: {e}") from e
        record = self.run_dir / "simulated_kills.json" if sim.mode != "drop" else None
        return FailureSimulator(sim, n_stages=self.n_stages, record=record)

    def rebuild_stages(self, lost: Sequence[int]) -> list[Rebuilt]:
        """Rebuild lost interior pipeline stages from their neighbours (collective: every rank calls it,
        between optimizer steps). Each gets a fresh optimizer state and its learning rate scaled by
        `fault.checkfree_lr_scale` from the next step on. Raises `CheckFreeRefused` with the reason
        when CheckFree cannot rebuild them (`checkfree_refusal` says so beforehand)."""
        refusal = self.checkfree_refusal(lost)
        if refusal:
            raise CheckFreeRefused(refusal)
        fault = self.cfg.fault
        optimizer = self.optimizers[0]
        rebuilt = rebuild_stages(
            self.parts.modules[0],
            stage=self.stage_ids[0],
            lost=lost,
            stage_layers=self.stage_layers,
            norms=dict(enumerate(self.progress.stage_grad_norms)),
            pp_group=self.mesh["pp"].get_group(),
            partners=self.swap_partners(),
            state=lambda param: adam_state(optimizer, param),
        )
        for r in rebuilt:
            if r.prev != r.next:  # a copy of its partner took its optimizer state too: a trained stand-in, no boost
                if r.stage in self.stage_ids:
                    reset_state_(self.optimizers[self.stage_ids.index(r.stage)])
                self.progress.lr_boosts[r.stage] = (fault.checkfree_lr_scale, self.progress.step)
            if self.env.is_main:
                log.info("checkfree: %s", rebuild_message(r, step=self.progress.step, fault=fault))
        return rebuilt

    def swap_partners(self) -> dict[int, int]:
        """Under CheckFree+, the stages rebuilt by copying their swap partner: the first and last, and
        (as the reference does) the second and second-to-last where they are not also interior
        neighbours of both (4 stages or more)."""
        if self.cfg.parallel.pp_route != "checkfree_plus":
            return {}
        n = self.n_stages
        copied = {0, n - 1} | ({1, n - 2} if n >= 4 else set())
        return {s: p for s in sorted(copied) if (p := swap_partner(s, n_stages=n)) is not None}

    def checkfree_refusal(self, lost: Sequence[int]) -> str | None:
        """Why CheckFree cannot rebuild the `lost` stages of this run, or None when it can. Pure (no
        communication), so every rank answers the same."""
        if self.cfg.fault.checkfree == "off":
            return f"stages {sorted(lost)} were lost and fault.checkfree=off: nothing rebuilds them"
        try:
            plan_rebuild(
                lost, stage_layers=self.stage_layers, stages_per_rank=len(self.stage_ids), partners=self.swap_partners()
            )
        except CheckFreeRefused as e:
            return str(e)
        return None

    def simulate_failures(self) -> list[int]:
        """Drop the stages the simulator draws for this step and rebuild them; a draw CheckFree would
        refuse is skipped (and logged). Returns the stages dropped."""
        assert self.simulator is not None
        step, lost = self.progress.step, self.simulator.draw(self.progress.step)
        refusal = self.checkfree_refusal(lost) if lost else None
        if refusal:
            self.simulator.skipped += 1
            if self.env.is_main:
                log.info("checkfree: simulated failure of stages %s after step %d skipped: %s", lost, step, refusal)
        if not lost or refusal:
            return []
        for index, stage in enumerate(self.stage_ids):
            if stage in lost:
                seed = self.cfg.fault.simulate.seed * 1_000_003 + step * 4099 + self.env.rank
                destroy_stage_(self.parts.modules[index], self.optimizers[index], seed=seed)
        self.rebuild_stages(lost)
        self.simulator.failures += len(lost)
        return lost

    def simulate_kill(self) -> None:
        """`fault.simulate.mode=crash|kill`: the ranks of the stages drawn for this step SIGKILL
        themselves, with `kill` after dropping their snapshots from their keeper (their machines'
        memory is gone, so the restart rebuilds them from their neighbours: recovery's CheckFree rung).
        Each step's failures happen once, however often a restart replays the step."""
        assert self.simulator is not None
        step, lost = self.progress.step, self.simulator.draw(self.progress.step)
        if not lost or step <= self.simulator.happened_through:
            return
        refusal = self.checkfree_refusal(lost)
        if refusal:
            self.simulator.skipped += 1
            if self.env.is_main:
                log.info("checkfree: simulated failure of stages %s after step %d skipped: %s", lost, step, refusal)
            return
        self.simulator.note_kill(step)
        mine = bool(set(lost) & set(self.stage_ids))
        mode = self.cfg.fault.simulate.mode
        if mode == "kill" and self.lose_memory is not None:
            if mine:
                self.lose_memory()
            # Every lost rank's memory is gone before the first of them dies: the others would be
            # fenced at that death, some perhaps before they dropped theirs (a partly lost stage).
            torch.distributed.barrier()
        if not mine:
            return
        what = "memory dropped, killed" if mode == "kill" else "killed"
        log.warning(
            "rank %d: simulated failure of stage %s after step %d: %s", self.env.rank, self.stage_ids, step, what
        )
        os.kill(os.getpid(), signal.SIGKILL)

    def stage_rebuild(self) -> StageRebuild | None:
        """What recovery needs to rebuild lost pipeline stages from their neighbours (CheckFree), None
        where this run has fewer than 3 stages or CheckFree is off."""
        if self.n_stages < 3 or self.cfg.fault.checkfree == "off":
            return None
        grid = self.mesh.mesh.cpu().numpy()
        axis = self.mesh.mesh_dim_names.index("pp")
        stage_of_rank = [0] * self.env.world_size
        for coordinate, rank in np.ndenumerate(grid):
            stage_of_rank[int(rank)] = int(coordinate[axis])
        return StageRebuild(
            stage_of_rank=tuple(stage_of_rank),
            refusal=self.checkfree_refusal,
            rebuild=lambda lost: [
                rebuild_message(r, step=self.progress.step, fault=self.cfg.fault) for r in self.rebuild_stages(lost)
            ],
        )

    def _stage_metrics(self) -> dict[str, float]:
        """Per-stage gradient norms (before and after clipping) under pipeline parallelism, the learning
        rate factors of rebuilt stages, and the simulator's counts."""
        out: dict[str, float] = {}
        if self.grad_norms is not None and self.n_stages > 1:
            for stage, (pre, post) in enumerate(zip(self.grad_norms.stages, self.grad_norms.clipped)):
                out[f"grad_norm_stage{stage}"] = pre
                out[f"grad_norm_clipped_stage{stage}"] = post
        decay = self.cfg.fault.checkfree_lr_decay_steps
        for stage in sorted(self.progress.lr_boosts):
            out[f"lr_scale_stage{stage}"] = self.progress.lr_scale(stage, decay_steps=decay)
        if self.simulator is not None:
            out.update(self.simulator.metrics())
        return out
