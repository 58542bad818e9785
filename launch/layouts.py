"""Where every tensor of a run would live on a topology, without running it.

Builds the model on the meta device once per rank under a fake process group, applies the same
parallelize code the trainer uses, and writes each tensor's layout (parameters and their AdamW
state) as JSON: the input of `resurgo-ckpt plan`, which then says what each rank of the new
topology will read from a checkpoint.

    python -m resurgo.launch.layouts --nproc 4 parallel.pp=2 parallel.tp=2 > layouts.json
    resurgo-ckpt plan runs/demo/checkpoints --layouts layouts.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_module
from torch.distributed.tensor import DTensor

from resurgo.checkpoint import layout_of
from resurgo.parallel.dims import ParallelDims
from resurgo.parallel.parallelize import build_model_parts
from resurgo.trainer.config import JobConfig, load_config
from resurgo.trainer.model import Transformer

OPTIMIZER_TENSORS = ("exp_avg", "exp_avg_sq")


def _rank_layouts(cfg: JobConfig, *, rank: int, world_size: int) -> dict[str, tuple[bool, dict[str, Any]]]:
    """Layouts of the tensors one rank would hold (model and optimizer state): name -> (sharded, layout)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        p = cfg.parallel
        dims = ParallelDims.resolve(
            pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, world_size=world_size
        )
        parts = build_model_parts(
            build=lambda: Transformer(cfg.model),
            mesh=dims.build_mesh("cpu"),
            dims=dims,
            device=torch.device("meta"),
            param_dtype=torch.float32,
            activation_checkpoint=False,
            seed=0,
            pp_schedule=p.pp_schedule,
            stages_per_rank=p.n_stages_per_rank,
            microbatches=p.n_microbatches,
            loss_fn=None,
            materialize=False,
        )
        tensors: dict[str, torch.Tensor] = {}
        for module in parts.modules:
            for fqn, param in module.named_parameters():
                tensors[f"model/{fqn}"] = param
                tensors.update({f"optim/state/{fqn}/{key}": param for key in OPTIMIZER_TENSORS})
                tensors[f"optim/state/{fqn}/step"] = torch.empty((), device="meta")
        return {name: (isinstance(t, DTensor), layout_of(name, t).to_json()) for name, t in tensors.items()}
    finally:
        dist.destroy_process_group()


def target_layouts(cfg: JobConfig, *, world_size: int) -> list[dict[str, Any]]:
    """Layout JSON entries ({"layout", "ranks"}) for every tensor of the run on `world_size` ranks."""
    entries: dict[str, dict[str, Any]] = {}
    for rank in range(world_size):
        for name, (sharded, layout) in _rank_layouts(cfg, rank=rank, world_size=world_size).items():
            if sharded:  # a DTensor's layout names every rank of its mesh
                entries.setdefault(name, {"layout": layout})
            else:
                entries.setdefault(name, {"layout": layout, "ranks": []})["ranks"].append(rank)
    return list(entries.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, required=True, help="world size of the target topology")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as given to resurgo-train")
    args = parser.parse_args(argv)
    with initialize_config_module(config_module="resurgo.recipes", version_base="1.3"):
        cfg = load_config(compose(config_name="train", overrides=args.overrides))
    json.dump(target_layouts(cfg, world_size=args.nproc), sys.stdout)


if __name__ == "__main__":
    main()
