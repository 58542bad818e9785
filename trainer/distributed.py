"""Process-group start-up: the same code path for one process and for torchrun."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from resurgo.checkpoint import FENCED_ENV, GENERATION_ENV, incarnation, launcher_pid, store_attempt, wait_released


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, *, timeout_s: float = 1800.0) -> DistEnv:
    """Join (or create) the default process group: NCCL+gloo on GPU, gloo on CPU; a collective that
    waits longer than `timeout_s` fails (fault.hang_timeout_s sets it).

    A plain `python -m` run becomes a world of one over an in-memory store, so the trainer never
    branches on "distributed or not".
    """
    timeout = timedelta(seconds=timeout_s)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if use_cuda:
        # A warm restart forks this worker as soon as its predecessor stopped running, before the
        # kernel freed that one's memory: its device memory must be back before this one takes any.
        fenced = [int(pid) for pid in os.environ.get(FENCED_ENV, "").split(",") if pid]
        wait_released(fenced, timeout_s=timeout_s, why="a warm restart's predecessors of this worker")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or GENERATION_ENV in os.environ:
            # The store outlives this worker: torchrun's agent's, or (warm restarts) the one rank 0's
            # supervisor hosts. It keeps keys across restarts, so restarted gloo workers would find their
            # dead predecessors' addresses: prefix by torchrun's attempt and the warm restart's
            # generation (a worker of an older one can never join a newer group).
            agent = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
            )
            store = dist.PrefixStore(f"attempt_{store_attempt()}_gen_{incarnation()[1]}", agent)
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world_size,
                device_id=dev if use_cuda else None,
                timeout=timeout,
            )
        elif "MASTER_ADDR" in os.environ:
            dist.init_process_group(
                backend, rank=rank, world_size=world_size, device_id=dev if use_cuda else None, timeout=timeout
            )
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return DistEnv(
        rank=rank, local_rank=local_rank, world_size=world_size, device=dev, local_world_size=local_world_size
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def stop_restarts() -> bool:
    """Ask this worker's torchrun agent to stop instead of restarting the workers (True if asked).

    torchrun restarts a failed worker group whatever the failure; for one no restart can change
    (the run's state is gone) that only repeats the verdict `--max-restarts` times. A SIGTERM makes
    the agent stop its workers and exit, as a scheduler's cancel would. This process ignores the
    signal the agent relays, so it finishes its own exit (error file, message) first.
    """
    parent = launcher_pid()  # under warm restarts, not the supervisor but its parent
    if "TORCHELASTIC_RUN_ID" not in os.environ or not _is_torchrun(parent):
        return False
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.getLogger(__name__).error("stopping torchrun (pid %d): a restart cannot change this failure", parent)
    os.kill(parent, signal.SIGTERM)
    return True


def _is_torchrun(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # not Linux, or the agent is gone: nothing to stop
    return b"torch.distributed.run" in cmdline or b"torchrun" in cmdline
