"""The parallelism a job asks for: the typed schema of `parallel.*` (its degrees, pipeline schedule
and elastic policy), owned here and composed into the job's config by the trainer."""

from __future__ import annotations

from dataclasses import dataclass

PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")
ELASTIC_POLICIES = ("off", "resize_dp")


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
