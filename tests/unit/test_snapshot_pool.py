"""Snapshots of a real trainer on 4 gloo ranks (tp=2 x dp_shard=2, so FSDP-over-TP strided shards):
what the keeper persists equals a synchronous save of the same step to the bit, and a restart
restored from the keeper's memory continues with bit-identical losses."""

from __future__ import annotations

import filecmp
import os
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_ckpt_workers import WORLD, workers
from test_keeper import serve  # noqa: F401  (fixture)

TOPOLOGY = {"tp": 2, "dp_shard": 2}


def make_trainer(
    run_dir: str, *, every: int, restarted: bool = False, ran_before: bool = False, keeper: str = "external"
):
    from resurgo.trainer.config import load_config
    from resurgo.trainer.distributed import init_distributed
    from resurgo.trainer.trainer import Trainer

    rank = torch.distributed.get_rank()
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), TORCHELASTIC_RESTART_COUNT=str(int(restarted)))
    cfg = load_config(
        OmegaConf.create(
            {
                "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
                "train": {
                    "device": "cpu",
                    "steps": 8,
                    "seq_len": 16,
                    "batch_size": 4,
                    "log_every": 0,
                    "precision": "fp32",
                },
                "parallel": TOPOLOGY,
                "checkpoint": {"every": every, "keep": 5},
                "fault": {"keeper": keeper},
            }
        )
    )
    trainer = Trainer(cfg, env=init_distributed("cpu"), run_dir=Path(run_dir))
    protection = trainer.build_protection(ran_before=ran_before)
    return trainer, protection


class SlowHook:
    """An end-of-step hook that takes a known time, as a snapshot's start or a synchronous save does."""

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self, step: int) -> None:
        time.sleep(HOOK_S)


HOOK_S = 0.5


def step_times_task(run_dir: str) -> list[float]:
    trainer, protection = make_trainer(run_dir, every=0, keeper="off")
    trainer.hooks.append(SlowHook())
    times = [trainer.train_step().step_time_s for _ in range(3)]
    protection.close(step=trainer.progress.step)
    trainer.close()
    return times


def persist_task(run_dir: str, sync_root: str) -> None:
    from resurgo.checkpoint.store.checkpointer import Checkpointer

    trainer, protection = make_trainer(run_dir, every=2)
    protection.resume()
    trainer.hooks += protection.hooks
    for _ in range(2):
        trainer.train_step()  # the keeper persists step 2 while...
    sync = Checkpointer(
        trainer.cfg.checkpoint, root=Path(sync_root), states=protection.states, topology=trainer.dims.as_dict()
    )
    sync.save(2)  # ...the same step is saved synchronously, with the copy possibly still in flight
    protection.close(step=2)
    trainer.close()


def restore_task(run_dir: str, told_by: str) -> list[float]:
    trainer, protection = make_trainer(run_dir, every=0)
    protection.resume()
    trainer.hooks += protection.hooks
    for _ in range(3):
        trainer.train_step()
    protection.engine.fence()
    trainer.hooks.clear()  # steps 4 and 5 are not snapshotted: the keeper's newest is step 3
    expected = [trainer.train_step().loss for _ in range(2)]  # the second depends on the optimizer state
    protection.close(step=3, ok=False)  # as if the worker died: the keeper keeps its snapshots

    # torchrun's restart count says so, or (a world whose every node never failed: replacements,
    # survivors of membership changes alone) only the keepers' memory of the run does.
    restarted, protection = make_trainer(
        run_dir, every=0, restarted=told_by == "restart count", ran_before=told_by == "keepers"
    )
    with torch.no_grad():
        for p in restarted.parts.parameters():
            p.mul_(0.5)  # a restart must not depend on the initial weights
    resumed = protection.resume()
    restarted.hooks += protection.hooks
    got = [restarted.train_step().loss for _ in range(2)]
    protection.close(step=restarted.progress.step)
    return [resumed.source, resumed.step, restarted.sampler.consumed, got, expected]


def same_tree(a: Path, b: Path) -> list[str]:
    """Relative paths of files that differ or exist on one side only."""
    comparison = filecmp.dircmp(a, b)
    out = [
        str(Path(comparison.left).relative_to(a) / n)
        for n in comparison.left_only + comparison.right_only + comparison.diff_files
    ]
    for name, _sub in comparison.subdirs.items():
        out += [f"{name}/{p}" for p in same_tree(a / name, b / name)]
    return out


def test_keeper_persist_equals_a_synchronous_save_to_the_bit(serve, tmp_path):  # noqa: F811
    serve().run_dir = tmp_path / "run0"  # the keeper of run0, in this process
    workers().run(persist_task, str(tmp_path / "run0"), str(tmp_path / "sync"))
    persisted, synchronous = tmp_path / "run0" / "checkpoints" / "step-00000002", tmp_path / "sync" / "step-00000002"
    assert persisted.is_dir() and synchronous.is_dir()
    files = [p for p in persisted.rglob("*") if p.is_file()]
    assert len(files) > 50  # every chunk of every tensor, metadata and marker
    for path in files:
        assert filecmp.cmp(path, synchronous / path.relative_to(persisted), shallow=False), path
    assert same_tree(persisted, synchronous) == []


@pytest.mark.parametrize("told_by", ["restart count", "keepers"])
def test_restart_from_keeper_memory_continues_bit_exactly(serve, tmp_path, told_by):  # noqa: F811
    serve()
    for source, step, consumed, got, expected in workers().run(restore_task, str(tmp_path / "run0"), told_by):
        assert (source, step, consumed) == ("memory", 3, 5 * 4)
        assert got == expected


def test_step_time_includes_the_end_of_step_hooks(tmp_path):
    times = workers().run(step_times_task, str(tmp_path))[0]
    # Each step after the first also pays its predecessor's hook (the tiny steps take far less).
    assert all(t >= HOOK_S for t in times[1:]), times
