"""The parallelism a job asks for: the typed schema of `parallel.*` (its degrees, pipeline schedule
and elastic policy), owned here and composed into the job's config by the trainer."""

from __future__ import annotations

from dataclasses import dataclass

PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")
PP_ROUTES = ("identity", "checkfree_plus")
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
    # The order micro-batches take through the stages in training. checkfree_plus (CheckFree+): odd
    # micro-batches run the first two and the last two stages swapped, so that each learns to stand in
    # for its partner, and stage 1 holds a copy of the embedding and stage pp-2 one of the output head;
    # a lost first or last stage is then rebuilt by copying its partner (fault.checkfree). GPipe or 1F1B,
    # one stage per rank. Evaluation always takes the identity route.
    pp_route: str = "identity"
    # How a run resumed on another number of processes picks its topology. off: the degrees as
    # given. resize_dp: keep tp and pp, resize data parallelism to what the world size leaves, and
    # raise grad_accum so that per-rank micro-batches grow no larger (train.batch_size never changes).
    elastic: str = "resize_dp"

    def __post_init__(self) -> None:
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"parallel.pp_schedule={self.pp_schedule!r}: choose one of {PP_SCHEDULES}")
        if self.elastic not in ELASTIC_POLICIES:
            raise ValueError(f"parallel.elastic={self.elastic!r}: choose one of {ELASTIC_POLICIES}")
        if self.pp_route not in PP_ROUTES:
            raise ValueError(f"parallel.pp_route={self.pp_route!r}: choose one of {PP_ROUTES}")
        if self.pp_route != "identity" and self.pp_schedule not in ("GPipe", "1F1B"):
            raise ValueError(
                f"parallel.pp_route={self.pp_route} runs one stage per rank: set parallel.pp_schedule to GPipe or 1F1B"
            )
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
