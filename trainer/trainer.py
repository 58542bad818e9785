"""The training loop: built once in a fixed order, then a few short methods per step.

Checkpointing plugs in through `StepHook`s: `before_optimizer_step` is the last moment the
parameters and optimizer state of the previous step are still unchanged (a lazy snapshot fences
there), `after_optimizer_step` the first moment the new ones exist (a snapshot begins there).
A pipeline stage lost without a copy is rebuilt from its neighbours (`rebuild_stages`, CheckFree)
between the two, where a simulated failure also strikes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from resurgo.checkpoint import CheckpointConfig, HeldSlots, ModelState, OptimizerState, Protection
from resurgo.parallel.clip import GradNorms, clip_grad_norms_
from resurgo.parallel.dims import ParallelDims
from resurgo.parallel.parallelize import ModelParts, build_model_parts
from resurgo.parallel.pipeline import set_accumulation, stage_ids_of, stage_layers

from .checkfree import rebuild_norms
from .config import JobConfig
from .data import GlobalSampler, make_tokenizer, token_stream
from .distributed import DistEnv
from .metrics import MetricsLogger
from .model import Transformer, count_params
from .optim import build_optimizer, lr_at, offload_metrics, set_lr
from .stage_failures import StageFailures
from .state import TrainProgress

log = logging.getLogger(__name__)


class StepHook(Protocol):
    def before_optimizer_step(self) -> None: ...

    def after_optimizer_step(self, step: int) -> None: ...


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    step_time_s: float  # since the previous step ended: its end-of-step hooks (snapshot start, a save) count here
    ended: float  # when it ended (Unix time); the record's `time` comes later, after the loss's all-reduce


class FromStep:
    """A Stateful that a checkpoint converted from another framework lacks (it holds tensors and a
    step): resuming from one derives it from the step rather than refusing to resume."""

    def __init__(self, state: Any, derive: Callable[[int], None]) -> None:
        self.state, self.derive = state, derive

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.load_state_dict(state_dict)

    def derive_from_step(self, step: int) -> None:
        self.derive(step)


class Trainer(StageFailures):
    def __init__(self, cfg: JobConfig, *, env: DistEnv, run_dir: Path) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        p, t = cfg.parallel, cfg.train
        self.dims = ParallelDims.resolve(
            pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, world_size=env.world_size
        )
        self._check_batch()
        self.mesh = self.dims.build_mesh(env.device.type)
        self.dp_rank = self.dims.dp_rank(self.mesh)
        torch.manual_seed(t.seed)
        self.sampler = self._build_sampler()
        self.parts: ModelParts = build_model_parts(
            build=lambda: Transformer(cfg.model),
            mesh=self.mesh,
            dims=self.dims,
            device=env.device,
            param_dtype=self._param_dtype(),
            activation_checkpoint=t.activation_checkpoint,
            seed=t.seed,
            pp_schedule=p.pp_schedule,
            stages_per_rank=p.n_stages_per_rank,
            microbatches=p.n_microbatches,
            loss_fn=self._pipeline_loss,
            route=p.pp_route,
        )
        # One optimizer per stage module: state stays keyed by the module that owns the parameter.
        self.optimizers = [
            build_optimizer(list(m.parameters()), cfg.optim, device=env.device) for m in self.parts.modules
        ]
        self.n_stages = self.dims.pp * (p.n_stages_per_rank if self.dims.pp > 1 else 1)
        self.stage_ids = (
            stage_ids_of(self.mesh["pp"].get_local_rank(), pp=self.dims.pp, stages_per_rank=p.n_stages_per_rank)
            if self.dims.pp > 1
            else [0]
        )
        self.stage_layers = stage_layers(cfg.model.n_layers, self.n_stages)
        copies = self.parts.copies()  # CheckFree+'s embedding and head copies count once, as their originals
        self._clipped = {  # each stage's parameters in a gradient norm, listed once rather than every step
            stage: [p for p in m.parameters() if p not in copies]
            for stage, m in zip(self.stage_ids, self.parts.modules)
        }
        self.progress = TrainProgress(
            seed=t.seed,
            rank=env.rank,
            topology=self.dims.as_dict(),
            model=asdict(cfg.model),
            n_stages=self.n_stages,
        )
        self.grad_norms: GradNorms | None = None  # the last step's, global and per stage
        self.simulator = self._build_simulator()
        self.lose_memory: Callable[[], None] | None = None  # drops this rank's snapshots (a simulated machine loss)
        self.hooks: list[StepHook] = []
        self._last_step_end: float | None = None  # when the previous step's record was taken
        self.metric_sources: list[Callable[[], dict[str, float]]] = [self._stage_metrics]  # more for each record
        if cfg.optim.offload.enabled:
            self.metric_sources.append(lambda: offload_metrics(self.optimizers))
        flops_per_token = 6 * count_params(cfg.model) + 12 * cfg.model.n_layers * cfg.model.dim * t.seq_len
        self.metrics = MetricsLogger(
            run_dir=run_dir,
            enabled=env.is_main,
            total_steps=t.steps,
            flops_per_token=flops_per_token,
            device=env.device,
        )

    # ---- construction helpers -------------------------------------------------------------

    def _check_batch(self) -> None:
        t, p, dims = self.cfg.train, self.cfg.parallel, self.dims
        per_pass = dims.dp * t.grad_accum * (p.n_microbatches if dims.pp > 1 else 1)
        if t.batch_size % per_pass:
            raise ValueError(
                f"train.batch_size={t.batch_size} must be divisible by data-parallel degree {dims.dp} x "
                f"train.grad_accum={t.grad_accum}"
                + (f" x parallel.microbatches={p.n_microbatches}" if dims.pp > 1 else "")
            )
        if self.cfg.model.tie_embeddings and (dims.pp > 1 or dims.tp > 1):
            raise ValueError("model.tie_embeddings needs parallel.pp=1 and parallel.tp=1")
        if t.seq_len > self.cfg.model.max_seq_len:
            raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={self.cfg.model.max_seq_len}")

    def _build_sampler(self) -> GlobalSampler:
        tokenizer = make_tokenizer(self.cfg.data.tokenizer)
        if tokenizer.vocab_size > self.cfg.model.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={self.cfg.model.vocab_size}"
            )
        tokens = token_stream(self.cfg.data, tokenizer)
        return GlobalSampler(tokens, seq_len=self.cfg.train.seq_len, seed=self.cfg.data.seed)

    def _param_dtype(self) -> torch.dtype:
        precision = self.cfg.train.precision
        if precision == "auto":
            precision = "bf16" if self.env.device.type == "cuda" else "fp32"
        return torch.bfloat16 if precision == "bf16" else torch.float32

    @property
    def states(self) -> dict[str, Any]:
        """Everything a checkpoint must hold, as Stateful objects, by key: the same keys in memory and
        on disk (model and optimizer state by parameter name, the data position, the progress)."""
        parts = self.parts.modules
        return {
            "model": ModelState(parts),
            "optim": OptimizerState(parts, self.optimizers),
            "data": FromStep(self.sampler, self._data_at),
            "train": FromStep(self.progress, self._progress_at),
        }

    def _data_at(self, step: int) -> None:
        """The data position after `step` optimizer steps of this run's global batch."""
        self.sampler.consumed = step * self.cfg.train.batch_size

    def _progress_at(self, step: int) -> None:
        """`step`, with the RNG re-derived as after a resume on another topology."""
        self.progress.load_state_dict({"step": step, "topology": {}, "rank": -1})

    def build_protection(
        self, *, checkpoint: CheckpointConfig | None = None, warmed: HeldSlots | None = None, ran_before: bool = False
    ) -> Protection:
        """This rank's checkpointing (collective: every rank builds it before `resume`): snapshots,
        saves and recovery of `states`. `checkpoint` overrides the job's `checkpoint.*`; `ran_before`:
        the keepers hold an earlier incarnation of this run, so it resumes whatever the restart counts."""
        env = self.env
        protection = Protection(
            checkpoint or self.cfg.checkpoint,
            self.cfg.fault,
            states=self.states,
            run_dir=self.run_dir,
            rank=env.rank,
            local_rank=env.local_rank,
            local_world_size=env.local_world_size,
            device=env.device,
            topology=self.dims.as_dict(),
            warmed=warmed,
            stages=self.stage_rebuild(),
            ran_before=ran_before,
        )
        self.lose_memory = protection.forget_memory
        return protection

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self) -> list[float]:
        losses = []
        while self.progress.step < self.cfg.train.steps:
            losses.append(self.train_step().loss)
        return losses

    def train_step(self) -> StepResult:
        """One step. Its time runs from the previous step's end, so it includes that step's hooks,
        which run after the record is logged (a step restored from memory always has its record)."""
        start = self._last_step_end if self._last_step_end is not None else time.perf_counter()
        inputs, targets = self.next_batch()
        loss = self.forward_backward(inputs, targets)
        self.grad_norms = self.clip_gradients()
        lr = self.optimizer_step()
        if self.simulator is not None and self.simulator.record is None:
            self.simulate_failures()
        self._last_step_end, ended = time.perf_counter(), time.time()  # before the loss's all-reduce
        result = StepResult(
            step=self.progress.step,
            loss=self.global_mean(loss),
            grad_norm=self.grad_norms.total.item(),
            lr=lr,
            step_time_s=self._last_step_end - start,
            ended=ended,
        )
        self.log(result)
        for hook in self.hooks:
            hook.after_optimizer_step(self.progress.step)
        if self.simulator is not None and self.simulator.record is not None:
            self.simulate_kill()  # after the hooks: the survivors' snapshots of this step are under way
        return result

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.sampler.next_batch(
            global_batch=self.cfg.train.batch_size, dp_rank=self.dp_rank, dp=self.dims.dp
        )
        return inputs.to(self.env.device), targets.to(self.env.device)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of this rank's batch (zero on ranks without the last pipeline stage)."""
        accum = self.cfg.train.grad_accum
        total = torch.zeros((), device=self.env.device)
        for index, (x, y) in enumerate(zip(inputs.chunk(accum), targets.chunk(accum))):
            self._sync_gradients(last=index == accum - 1)
            if self.parts.schedule is None:
                loss = cross_entropy(self.parts.modules[0](x), y) / accum
                loss.backward()
                total += loss.detach()
            else:
                losses: list[torch.Tensor] = []
                set_accumulation(self.parts.schedule, last=index == accum - 1)
                args = (x,) if self.parts.has_first_stage else ()
                target = y if self.parts.has_last_stage else None
                self.parts.schedule.step(*args, target=target, losses=losses)
                if losses:
                    total += torch.stack(losses).mean().detach()
        return total

    def clip_gradients(self) -> GradNorms:
        """Clip to the global norm; keep each stage's norm for a CheckFree rebuild (and a restart)."""
        offloaded = self.cfg.optim.offload.enabled  # its gradients may have left already: it applies the factor
        norms = clip_grad_norms_(
            self._clipped,
            n_stages=self.n_stages,
            max_norm=self.cfg.optim.grad_clip,
            pp=self.dims.pp,
            in_place=not offloaded,
        )
        if offloaded and self.cfg.optim.grad_clip > 0:
            for optimizer in self.optimizers:
                optimizer.scale_gradients(norms.scale)
        self.progress.stage_grad_norms = rebuild_norms(norms)
        return norms

    def optimizer_step(self) -> float:
        """One step of every stage's optimizer at the schedule's learning rate (a rebuilt stage's scaled)."""
        for hook in self.hooks:
            hook.before_optimizer_step()
        lr = lr_at(self.progress.step, cfg=self.cfg.optim, total_steps=self.cfg.train.steps)
        decay = self.cfg.fault.checkfree_lr_decay_steps
        for stage, optimizer in zip(self.stage_ids, self.optimizers):
            set_lr(optimizer, lr * self.progress.lr_scale(stage, decay_steps=decay))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self.progress.drop_spent_boosts(decay_steps=decay)
        return lr

    def log(self, result: StepResult) -> None:
        every = self.cfg.train.log_every
        if every and (result.step % every == 0 or result.step == self.cfg.train.steps):
            tokens = self.cfg.train.batch_size * self.cfg.train.seq_len
            record = {**result.__dict__, "tokens_per_s": tokens / result.step_time_s}
            for source in self.metric_sources:
                record.update(source())
            self.metrics.log(record)

    # ---- small pieces -------------------------------------------------------------------------

    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets) / self.cfg.train.grad_accum

    def _sync_gradients(self, *, last: bool) -> None:
        """Reduce gradients only on the last accumulation pass (FSDP2 / replicate)."""
        for module in self.parts.modules:
            if hasattr(module, "set_requires_gradient_sync"):
                module.set_requires_gradient_sync(last)

    def global_mean(self, loss: torch.Tensor) -> float:
        """Average the per-rank losses over data parallelism (only last-stage ranks hold one)."""
        value = loss.detach().double()
        if self.env.world_size > 1:
            dist.all_reduce(value)
            value /= self.dims.dp * self.dims.tp
        return value.item()

    def close(self) -> None:
        self.metrics.close()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
