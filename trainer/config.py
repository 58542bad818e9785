"""The typed schema of a training job, composed from the schemas each package owns (parallel/,
checkpoint/) and the trainer's own (model, optimizer, data, loop).

Recipes and the command line only fill these dataclasses in: Hydra composes the YAML, then
`load_config` merges it onto the schema (so unknown keys and wrong types fail early) and converts it
once with `OmegaConf.to_object`. Every value a user can type lives here, with its meaning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from resurgo.checkpoint import CheckpointConfig, ErasureConfig, FaultConfig
from resurgo.parallel.config import ParallelConfig

from .offload_config import OffloadConfig

PRECISIONS = ("auto", "fp32", "bf16")
__all__ = ["CheckpointConfig", "ErasureConfig", "FaultConfig", "JobConfig", "ParallelConfig", "load_config"]


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder."""

    name: str = "tiny"
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads must be a multiple of it
    vocab_size: int = 256  # the byte tokenizer needs 256; a larger table is padding
    ffn_hidden: int = 0  # 0: derived as in Llama (8/3 * dim rounded up to ffn_multiple_of)
    ffn_multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("RoPE needs an even head dimension: choose model.dim / model.n_heads even")

    @property
    def hidden_dim(self) -> int:
        """MLP width: `ffn_hidden`, or Llama's 8/3 * dim rounded up to `ffn_multiple_of`."""
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-int(8 * self.dim / 3) // self.ffn_multiple_of) * self.ffn_multiple_of

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio * lr."""

    warmup_steps: int = 10
    decay_steps: int = 0  # 0: until train.steps
    min_lr_ratio: float = 0.1


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)  # optimizer state in host memory

    def __post_init__(self) -> None:
        if self.offload.enabled and self.name != "adamw":
            raise ValueError(f"optim.offload.mode={self.offload.mode!r} supports optim.name=adamw only")
        if self.name != "adamw":
            raise ValueError(f"optim.name={self.name!r}: only 'adamw' is available")


@dataclass
class DataConfig:
    """Where tokens come from. `source`: 'embedded', a text/jsonl file, or a .bin/.npy token file."""

    source: str = "embedded"
    tokenizer: str = "bytes"  # 'bytes', or a local path to a Hugging Face tokenizer
    token_dtype: str = "uint16"  # element type of a raw .bin token file
    jsonl_key: str = "text"
    seed: int = 1234  # shuffles the sample order; independent of train.seed


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    batch_size: int = 8  # global sequences per optimizer step, over all data-parallel ranks
    seq_len: int = 128
    grad_accum: int = 1  # forward/backward passes per optimizer step on each rank
    activation_checkpoint: bool = False  # recompute block activations in backward to save memory
    precision: str = "auto"  # auto: bf16 params with fp32 reductions on GPU, fp32 on CPU
    log_every: int = 1
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}: choose one of {PRECISIONS}")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 1 or self.grad_accum < 1:
            raise ValueError("train.steps >= 0, train.batch_size >= 1, train.seq_len >= 1, train.grad_accum >= 1")


@dataclass
class RunConfig:
    name: str = ""  # '' : the rendezvous id under torchrun, else 'default'
    root: str = "runs"


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_config(cfg: DictConfig | dict) -> JobConfig:
    """Validate a composed config against the schema and convert it once to dataclasses.

    With `checkpoint.init_from=hf:PATH` the model section comes from the folder's config.json, so a
    user need not restate the model; a model field the user set explicitly must agree with it."""
    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
    job = OmegaConf.to_object(merged)
    fixed = job.checkpoint.init_model()
    if not fixed:
        return job
    explicit = _explicit_model_fields(cfg)
    _check_explicit(job.model, fixed, explicit=explicit, source=job.checkpoint.init_from)
    # An explicit max_seq_len only sizes the RoPE table: the user's wins.
    keep = {"max_seq_len"} & explicit
    return replace(job, model=replace(job.model, **{k: v for k, v in fixed.items() if k not in keep}))


def _explicit_model_fields(cfg: DictConfig | Mapping[str, Any]) -> set[str]:
    """The model fields the user chose: under Hydra, those named on the command line (`model.dim=`;
    all of them for a preset, `model=8b`); for a config given as a mapping, those it holds."""
    every = {f.name for f in fields(ModelConfig)} - {"name"}
    if HydraConfig.initialized():
        chosen: set[str] = set()
        for override in HydraConfig.get().overrides.task:
            key = override.split("=", 1)[0].lstrip("+~")
            if key == "model":
                return every
            if key.startswith("model."):
                chosen.add(key[len("model.") :])
        return chosen & every
    model = cfg.get("model") if isinstance(cfg, (Mapping, DictConfig)) else None
    return set(model or {}) & every


def _check_explicit(model: ModelConfig, fixed: Mapping[str, Any], *, explicit: set[str], source: str) -> None:
    """A clear error naming every explicitly set model field that contradicts config.json."""
    ours = {k: getattr(model, k) for k in fixed}
    ours["ffn_hidden"] = model.hidden_dim  # ffn_multiple_of derives it when ffn_hidden is 0
    hidden_set = bool(explicit & {"ffn_hidden", "ffn_multiple_of"})
    differ = [
        f"model.{k}={ours[k]} (config.json: {v})"
        for k, v in fixed.items()
        if k != "max_seq_len" and (k in explicit or (k == "ffn_hidden" and hidden_set)) and ours[k] != v
    ]
    if differ:
        raise ValueError(
            f"checkpoint.init_from={source} fixes the model, but the model fields set here differ: "
            f"{', '.join(differ)}; drop these overrides (the model comes from config.json) or set them as it says"
        )
