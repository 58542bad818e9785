"""How state is protected: the typed schemas of `checkpoint.*` and `fault.*` (keeper, erasure coding,
hang watch), owned here and composed into the job's config by the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .store.codec import ChunkCodec

KEEPER_MODES = ("auto", "off", "external")
CHECKFREE_MODES = ("off", "fallback", "always")
SIMULATE_MODES = ("drop", "crash", "kill")


@dataclass
class CheckpointConfig:
    dir: str = ""  # '' : <run folder>/checkpoints
    every: int = 0  # write a universal checkpoint every N steps; 0: never
    snapshot_every: int = 1  # host-memory snapshot every N steps
    keep: int = 3  # committed checkpoints kept on disk
    resume: str = "none"  # none | latest | a checkpoint path
    compression: str = "none"  # none | a numcodecs codec id such as 'lz4' or 'zstd'
    # Initial weights of a fresh run (fresh optimizer): a safetensors file or folder under resurgo's
    # names, or hf:PATH, a Hugging Face Llama folder whose config.json also sets the model.* fields.
    init_from: str = ""
    load_optimizer: bool = True  # false: weights only (fine-tuning)
    exclude: list[str] = field(default_factory=list)  # glob patterns of tensors not to load
    host_memory_gb: float = 0.0  # keeper budget per node for snapshots and the shares workers scale; 0: three snapshots per rank (one being written, one complete everywhere, one persisting)

    def __post_init__(self) -> None:
        if self.every < 0 or self.snapshot_every < 0 or self.keep < 1:
            raise ValueError("checkpoint.every >= 0, checkpoint.snapshot_every >= 0, checkpoint.keep >= 1")
        ChunkCodec.parse(self.compression)  # at start, not at the first save
        if self.init_from.strip() == "hf:":
            raise ValueError("checkpoint.init_from=hf:PATH needs the path of a Hugging Face model folder")

    def init_model(self) -> dict[str, Any]:
        """The `model.*` fields that `init_from` fixes: a Hugging Face folder's config.json says
        which model its weights are for ({} for every other source)."""
        from .store.hf_io import hf_model_fields  # reads files and imports torch: only when asked

        return hf_model_fields(self.init_from)


@dataclass
class ErasureConfig:
    """Reed-Solomon coding of the keepers' snapshots across nodes: any m lost nodes of a group of
    k+m come back from the others' memory, for m/k of a snapshot in extra host memory per node."""

    data: str = "auto"  # k nodes of data per group, or 'auto': the node count minus parity (one group)
    parity: int = 1  # m parity nodes per group (lost nodes survived); 0: no coding across nodes
    every: int = 1  # code every n-th snapshot: 1/n of the traffic, up to n more steps lost with a node
    max_mb_s: float = 0.0  # cap on the parity traffic each keeper sends, MB/s, to spare the training's network; 0: none
    encode: str = (
        "auto"  # where shares of parity rows >= 1 are scaled: host (the holders), device (the workers), auto (measured)
    )

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
class SimulateConfig:
    """Stage failures on purpose, to measure what CheckFree's rebuilds cost in loss. The draw is seeded and
    the same on every rank whatever the topology: after optimizer step s, stage i fails when a generator
    seeded with (seed, s) draws below the rate for it."""

    stage_failure_rate: float = 0.0  # probability that a stage fails after a step, per stage; 0: none drawn
    # drop: in the training process, the stage's parameters are overwritten with noise and its optimizer
    # state cleared, then it is rebuilt from its neighbours by the same code as after a real loss.
    # crash: the stage's ranks SIGKILL themselves (their keeper keeps their snapshots): the restart
    # restores them from memory. kill: their machines are lost: they drop their snapshots from their
    # keeper first, so the restart rebuilds the stage from its neighbours (fault.checkfree).
    mode: str = "drop"
    seed: int = 0
    at: list[str] = field(default_factory=list)  # failures at fixed points as well, 'stage@step' ('2@10'): tests, demos

    def __post_init__(self) -> None:
        if not 0.0 <= self.stage_failure_rate <= 1.0:
            raise ValueError(
                f"fault.simulate.stage_failure_rate={self.stage_failure_rate} must be within 0..1 "
                "(a probability per stage and step)"
            )
        if self.mode not in SIMULATE_MODES:
            raise ValueError(f"fault.simulate.mode={self.mode!r}: choose one of {SIMULATE_MODES}")
        self.forced()  # a malformed entry fails at start

    @property
    def active(self) -> bool:
        return self.stage_failure_rate > 0 or bool(self.at)

    def forced(self) -> dict[int, list[int]]:
        """The fixed failures of `at`, as step -> stages."""
        out: dict[int, list[int]] = {}
        for entry in self.at:
            stage, _, step = str(entry).partition("@")
            if not (stage.isdigit() and step.isdigit()):
                raise ValueError(f"fault.simulate.at entry {entry!r} must be 'stage@step', such as '2@10'")
            out.setdefault(int(step), []).append(int(stage))
        return out


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
    # A peer node whose keeper answers no heartbeat (every 0.5 s) for this long is dead or hung: its
    # survivors end their ranks, and the restart leaves it behind. Far shorter than hang_timeout_s: a
    # keeper greets from a thread of its own, not held up by training, so a long silence is the node's.
    # 0: hang_timeout_s applies to peers too.
    peer_timeout_s: float = 10.0
    # CheckFree: a pipeline stage lost with every replica is rebuilt from its two neighbours' weights
    # (weighted by their last gradient norms), with a fresh optimizer state. off: never. fallback: only
    # when neither memory, peers nor the store can restore it. always: no snapshot or checkpoint of stage
    # state is relied on; a lost stage is always rebuilt (first and last stages: not yet, CheckFree+).
    checkfree: str = "fallback"
    checkfree_lr_scale: float = 1.1  # a rebuilt stage's learning rate is the schedule's times this, from then on
    checkfree_lr_decay_steps: int = 0  # 0: the scale stays; N: it falls linearly back to 1 over N steps
    simulate: SimulateConfig = field(default_factory=SimulateConfig)

    @property
    def collective_timeout_s(self) -> float:
        if not self.hang_timeout_s:
            return 1800.0
        return self.hang_timeout_s * (1 if self.keeper == "off" else 2)

    def __post_init__(self) -> None:
        if self.keeper not in KEEPER_MODES:
            raise ValueError(f"fault.keeper={self.keeper!r}: choose one of {KEEPER_MODES}")
        if self.hang_timeout_s < 0:
            raise ValueError(
                f"fault.hang_timeout_s={self.hang_timeout_s} must be >= 0 (seconds; 0 turns the watch off)"
            )
        if self.peer_timeout_s < 0:
            raise ValueError(
                f"fault.peer_timeout_s={self.peer_timeout_s} must be >= 0 (seconds; 0: fault.hang_timeout_s)"
            )
        if self.keeper_lease_s <= 0:
            raise ValueError(f"fault.keeper_lease_s={self.keeper_lease_s} must be > 0 (seconds)")
        if self.checkfree not in CHECKFREE_MODES:
            raise ValueError(f"fault.checkfree={self.checkfree!r}: choose one of {CHECKFREE_MODES}")
        if self.checkfree_lr_scale <= 0:
            raise ValueError(
                f"fault.checkfree_lr_scale={self.checkfree_lr_scale} must be > 0 (1: a rebuilt stage keeps the "
                "schedule's learning rate)"
            )
        if self.checkfree_lr_decay_steps < 0:
            raise ValueError(
                f"fault.checkfree_lr_decay_steps={self.checkfree_lr_decay_steps} must be >= 0 (0: the scale stays)"
            )
        if self.simulate.active and self.simulate.mode == "drop" and self.checkfree == "off":
            raise ValueError(
                "fault.simulate drops stages and rebuilds them with CheckFree, but fault.checkfree=off: "
                "set fault.checkfree=fallback (or always), or simulate nothing (fault.simulate.stage_failure_rate=0, at=[])"
            )
