"""The typed schema of a training job.

Recipes and the command line only fill these dataclasses in: Hydra composes the YAML, then
`load_config` merges it onto the schema (so unknown keys and wrong types fail early) and converts it
once with `OmegaConf.to_object`. Every value a user can type lives here, with its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from resurgo.checkpoint.store.codec import ChunkCodec

PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")
ELASTIC_POLICIES = ("off", "resize_dp")
PRECISIONS = ("auto", "fp32", "bf16")
KEEPER_MODES = ("auto", "off", "external")


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
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
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
class ParallelConfig:
    """Degrees of each parallelism; their product must equal the world size."""

    dp_replicate: int = 1  # pure replicas (DDP, or the outer axis of HSDP)
    dp_shard: int = -1  # FSDP2 sharding degree; -1: whatever the other degrees leave
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"  # GPipe | 1F1B | Interleaved1F1B
    microbatches: int = 0  # pipeline microbatches per step; 0: 2 * pp
    stages_per_rank: int = 0  # 0: 2 for Interleaved1F1B, else 1
    # How a run resumed on another number of processes picks its topology. off: the degrees as
    # given. resize_dp: keep tp and pp, resize data parallelism to what the world size leaves, and
    # raise grad_accum so that per-rank micro-batches grow no larger (train.batch_size never changes).
    elastic: str = "resize_dp"

    def __post_init__(self) -> None:
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"parallel.pp_schedule={self.pp_schedule!r}: choose one of {PP_SCHEDULES}")
        if self.elastic not in ELASTIC_POLICIES:
            raise ValueError(f"parallel.elastic={self.elastic!r}: choose one of {ELASTIC_POLICIES}")
        if self.stages_per_rank > 1 and self.pp_schedule != "Interleaved1F1B":
            raise ValueError("parallel.stages_per_rank > 1 needs parallel.pp_schedule=Interleaved1F1B")

    # Derived values are properties, not rewritten fields: the schema's defaults are built once,
    # before the recipe is merged, so a rewritten default would ignore the user's other keys.
    @property
    def n_microbatches(self) -> int:
        return self.microbatches or 2 * self.pp

    @property
    def n_stages_per_rank(self) -> int:
        return self.stages_per_rank or (2 if self.pp_schedule == "Interleaved1F1B" else 1)


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

    def __post_init__(self) -> None:
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
class CheckpointConfig:
    dir: str = ""  # '' : <run folder>/checkpoints
    every: int = 0  # write a universal checkpoint every N steps; 0: never
    snapshot_every: int = 1  # host-memory snapshot every N steps
    keep: int = 3  # committed checkpoints kept on disk
    resume: str = "none"  # none | latest | a checkpoint path
    compression: str = "none"  # none | a numcodecs codec id such as 'lz4' or 'zstd'
    init_from: str = ""  # safetensors file or folder: initial weights of a fresh run (fresh optimizer)
    load_optimizer: bool = True  # false: weights only (fine-tuning)
    exclude: list[str] = field(default_factory=list)  # glob patterns of tensors not to load
    host_memory_gb: float = 0.0  # keeper budget per node for snapshots and the shares workers scale; 0: three snapshots per rank (one being written, one complete everywhere, one persisting)

    def __post_init__(self) -> None:
        if self.every < 0 or self.snapshot_every < 0 or self.keep < 1:
            raise ValueError("checkpoint.every >= 0, checkpoint.snapshot_every >= 0, checkpoint.keep >= 1")
        ChunkCodec.parse(self.compression)  # at start, not at the first save


@dataclass
class ErasureConfig:
    """Reed-Solomon coding of the keepers' snapshots across nodes: any m lost nodes of a group of
    k+m come back from the others' memory, for m/k of a snapshot in extra host memory per node."""

    data: str = "auto"  # k nodes of data per group, or 'auto': the node count minus parity (one group)
    parity: int = 1  # m parity nodes per group (lost nodes survived); 0: no coding across nodes
    every: int = 1  # code every n-th snapshot: 1/n of the traffic, up to n more steps lost with a node
    max_mb_s: float = 0.0  # cap on the parity traffic each keeper sends, MB/s, to spare the training's network; 0: none
    encode: str = "auto"  # where shares of parity rows >= 1 are scaled: host (the holders), device (the workers), auto (measured)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"fault.erasure.every={self.every} must be >= 1")
        if self.max_mb_s < 0:
            raise ValueError(f"fault.erasure.max_mb_s={self.max_mb_s} must be >= 0 (0: no cap)")
        if not 0 <= self.parity <= 4:
            raise ValueError(f"fault.erasure.parity={self.parity} must be within 0..4 (0 turns coding off)")
        if self.encode not in ("auto", "host", "device"):
            raise ValueError(f"fault.erasure.encode={self.encode!r} must be auto, host or device")
        if self.data != "auto" and not (self.data.isdigit() and 1 <= int(self.data) <= 32):
            raise ValueError(f"fault.erasure.data={self.data!r} must be 'auto' or a node count within 1..32")


@dataclass
class FaultConfig:
    keeper: str = "auto"  # auto: local rank 0 starts one if none runs | off | external
    erasure: ErasureConfig = field(default_factory=ErasureConfig)
    # How long a keeper holds its snapshots with no worker connected while the workers' launcher (their
    # torchrun agent) lives, for a restart to resume from memory; a keeper whose launcher is gone exits.
    keeper_lease_s: float = 900.0
    # A rank that finishes no step for this long is hung (a stopped process, a deadlock, a node gone
    # with its sockets open): its keeper ends the node's ranks and the launcher's restart resumes from
    # memory; a peer node's keeper silent for as long ends them too. Collectives time out at twice
    # this with a keeper (a backstop; the keeper acts first and says why), at this without one.
    # Longer than the slowest step, checkpoint save included. 0: no watch, collectives at 30 minutes.
    hang_timeout_s: float = 600.0

    @property
    def collective_timeout_s(self) -> float:
        if not self.hang_timeout_s:
            return 1800.0
        return self.hang_timeout_s * (1 if self.keeper == "off" else 2)

    def __post_init__(self) -> None:
        if self.keeper not in KEEPER_MODES:
            raise ValueError(f"fault.keeper={self.keeper!r}: choose one of {KEEPER_MODES}")
        if self.hang_timeout_s < 0:
            raise ValueError(f"fault.hang_timeout_s={self.hang_timeout_s} must be >= 0 (seconds; 0 turns the watch off)")
        if self.keeper_lease_s <= 0:
            raise ValueError(f"fault.keeper_lease_s={self.keeper_lease_s} must be > 0 (seconds)")


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
    """Validate a composed config against the schema and convert it once to dataclasses."""
    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
    return OmegaConf.to_object(merged)
