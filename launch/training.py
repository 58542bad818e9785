"""One training run, Hydra in: what `resurgo-train` / `python -m resurgo.launch.train` runs, cold or warm.

Safe under torchrun: the run folder never depends on the time, only rank 0 writes Hydra's output,
Hydra never changes directory, and torchelastic's `@record` sits inside `@hydra.main` so the
error file is written before Hydra turns an exception into `sys.exit(1)`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.elastic.multiprocessing.errors import record

from resurgo.checkpoint import (
    CheckpointError,
    Comm,
    HeldSlots,
    NothingToResume,
    PeerUnreachable,
    SaveFailed,
    WorldIncomplete,
    prefetch_ahead,
    previous_topology,
)
from resurgo.launch import warm
from resurgo.launch.process_tree import exit_now
from resurgo.parallel.dims import ParallelDims
from resurgo.parallel.elastic import fit_topology
from resurgo.trainer.config import JobConfig, load_config
from resurgo.trainer.data import read_ahead
from resurgo.trainer.distributed import DistEnv, init_distributed, shutdown, stop_restarts
from resurgo.trainer.trainer import Trainer


def run_name(name: str) -> str:
    """The configured name, else torchrun's rendezvous id, else 'default'."""
    return name or os.environ.get("TORCHELASTIC_RUN_ID", "") or "default"


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
HYDRA_VERSION, RECIPES, CONFIG_NAME = "1.3", "resurgo.recipes", "train"  # where the job's config is composed from


@record
def train(cfg: JobConfig) -> list[float]:
    env = init_distributed(cfg.train.device, timeout_s=cfg.fault.collective_timeout_s)
    logging.getLogger(__name__).info("process group of %d ranks formed", env.world_size)
    trainer = protection = None
    finished = False
    run_dir = Path(cfg.run.root) / run_name(cfg.run.name)
    try:
        trainer, prior = build(cfg, env=env, run_dir=run_dir)
        protection = trainer.build_protection(warmed=prior.warmed, ran_before=prior.ran_before)
        protection.resume()
        trainer.hooks += protection.hooks
        trainer.metric_sources.append(protection.metrics)
        losses = trainer.fit()
        finished = True
        return losses
    finally:
        if protection is not None:
            # After a failure the keeper keeps its snapshots for the restart; after success it persists the end.
            protection.close(step=trainer.progress.step, ok=finished)
        if trainer is not None:
            trainer.close()
        shutdown()


def build(cfg: JobConfig, *, env: DistEnv, run_dir: Path) -> tuple[Trainer, Prior]:
    """The trainer for this world (collective); a config it cannot run becomes WrongForThisWorld."""
    try:
        cfg, prior = fit_world(cfg, world_size=env.world_size, run_dir=run_dir)
        return Trainer(cfg, env=env, run_dir=run_dir), prior
    except CheckpointError:
        raise  # the run's saved state, not the config: recorded and handled as such
    except (ValueError, OmegaConfBaseException) as e:
        raise WrongForThisWorld(str(e)) from e


class WrongForThisWorld(ValueError):
    """The config cannot run on this world (degrees, batch, model): every restart would fail the
    same way, so the job stops rather than spend its restarts on it."""


@dataclass(frozen=True)
class Prior:
    """What the keepers know of this run before it starts (collective): whether it ran before, and
    this node's memory readied for the restore. torchrun's restart counts cannot tell: a replacement
    node starts at 0, and so do survivors whose workers were restarted only because nodes joined."""

    ran_before: bool = False
    warmed: HeldSlots | None = None


def fit_world(cfg: JobConfig, *, world_size: int, run_dir: Path) -> tuple[JobConfig, Prior]:
    """The config with parallel degrees fitted to this world (collective): on a restart after nodes
    were lost or added, the elastic policy resizes data parallelism from the topology being resumed.
    With erasure protection, also this node's memory being readied for the restore (`prefetch_ahead`)."""
    # Asked on every start, not only on restarts: a replacement node joins with restart count 0.
    previous = previous_topology(run_dir, comm=Comm.create()) if cfg.fault.keeper != "off" else None
    if previous is None:
        return cfg, Prior()  # a first start: the degrees are the user's, and wrong ones get ParallelDims' message
    fitted = fit_topology(cfg.parallel, cfg.train, world_size=world_size, previous=previous)
    rank = int(os.environ.get("RANK", 0))
    if fitted.note and rank == 0:
        logging.getLogger(__name__).info("elastic: %s", fitted.note)
    p = fitted.parallel
    dims = ParallelDims.resolve(
        pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, world_size=world_size
    )
    # The keeper fetches, and this process maps, what the restore reads while the model is built.
    warmed = prefetch_ahead(run_dir, rank=rank, topology=dims.as_dict()) if cfg.fault.erasure.parity > 0 else None
    fitted_cfg = replace(cfg, parallel=fitted.parallel, train=replace(cfg.train, grad_accum=fitted.grad_accum))
    return fitted_cfg, Prior(ran_before=True, warmed=warmed)


@hydra.main(version_base=HYDRA_VERSION, config_path=f"pkg://{RECIPES}", config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        job = load_config(cfg)
    except (ValueError, OmegaConfBaseException) as e:
        stop_restarts()  # the same config fails every restart the same way
        user_error(e)
    if warm.enabled():
        # The config is composed, logging set up and the tokens read once, here; each worker forked inherits them.
        read_ahead(job.data)
        exit_now(warm.supervise(lambda: _train_or_explain(job)))
    _train_or_explain(job)


def _train_or_explain(job: JobConfig) -> None:
    try:
        train(job)
    except (
        NothingToResume,
        PeerUnreachable,
        SaveFailed,
        WrongForThisWorld,
    ) as e:  # cleaned up and recorded by now: no restart can change it, so stop
        logging.getLogger(__name__).error("%s", e)  # before the agent stops: its signal may cut Hydra's report short
        stop_restarts()
        user_error(e)
    except (
        ValueError,
        OmegaConfBaseException,
        WorldIncomplete,  # torchrun's restart takes the nodes left out into the next round
    ) as e:  # a damaged checkpoint, or a failure a restart may mend: the message says what to do
        user_error(e)


def user_error(e: BaseException) -> None:
    """Exit 1 with the message alone; RESURGO_DEBUG=1 (or Hydra's HYDRA_FULL_ERROR=1) shows the traceback."""
    if os.environ.get("RESURGO_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise e
    print(f"error: {e}\n(RESURGO_DEBUG=1 shows where it was raised)", file=sys.stderr)
    sys.exit(1)


def _torchrun_safe_argv(argv: list[str], rank: int) -> list[str]:
    """Drop `--local_rank` (from torch.distributed.launch) and keep Hydra's files to rank 0."""
    kept = []
    for arg in argv:
        if arg.startswith(("--local_rank", "--local-rank")):
            if "=" in arg:
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        kept.append(arg)
    if rank != 0:
        kept += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return kept


def main() -> None:
    """Train with the arguments in sys.argv (a template's forked rank sets them before calling this)."""
    sys.argv = [sys.argv[0]] + _torchrun_safe_argv(sys.argv[1:], int(os.environ.get("RANK", 0)))
    try:
        _hydra_main()
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


if __name__ == "__main__":
    main()
