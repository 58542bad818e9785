"""Degrees of parallelism, validated once, and the one named DeviceMesh built from them."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# Outer to inner: pipeline stages talk least, tensor-parallel peers most, so tp is innermost
# (adjacent ranks, the same node) and pp outermost.
AXES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int

    @classmethod
    def resolve(cls, *, pp: int, dp_replicate: int, dp_shard: int, tp: int, world_size: int) -> ParallelDims:
        """Fill dp_shard=-1 with what the other degrees leave, then validate."""
        if dp_shard == -1:
            rest = pp * dp_replicate * tp
            if rest < 1 or world_size % rest:
                raise ValueError(
                    f"world size {world_size} is not divisible by parallel.pp*dp_replicate*tp = {rest}; "
                    "change the degrees or the number of processes"
                )
            dp_shard = world_size // rest
        dims = cls(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, world_size=world_size)
        dims.validate()
        return dims

    def validate(self) -> None:
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise ValueError(f"parallel.{axis}={getattr(self, axis)} must be >= 1 (dp_shard may be -1: auto)")
        product = self.pp * self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise ValueError(
                f"parallel.pp*dp_replicate*dp_shard*tp = {self.pp}*{self.dp_replicate}*{self.dp_shard}*{self.tp}"
                f" = {product}, but {self.world_size} processes were launched; make them equal "
                "(or set parallel.dp_shard=-1 to fill the rest)"
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches one step sees."""
        return self.dp_replicate * self.dp_shard

    def as_dict(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """One mesh over all axes; submeshes are taken by axis name, never as group globals."""
        return init_device_mesh(device_type, tuple(getattr(self, a) for a in AXES), mesh_dim_names=AXES)

    def dp_rank(self, mesh: DeviceMesh) -> int:
        """This rank's index among the data-parallel ranks (replicate-major), for data loading."""
        return mesh["dp_replicate"].get_local_rank() * self.dp_shard + mesh["dp_shard"].get_local_rank()
