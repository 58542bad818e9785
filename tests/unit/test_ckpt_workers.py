"""A pool of gloo CPU processes shared by the checkpoint tests.

Starting torch in a process costs seconds on a small machine, so the ranks are started once per test
session and each test sends them a module-level function to run. A test that hangs or crashes
a rank gets the pool killed and restarted, so one failure does not cascade.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

WORLD = 4
_pool: Workers | None = None


def workers() -> Workers:
    """The shared pool of WORLD ranks (started on first use)."""
    global _pool
    if _pool is None or not _pool.alive():
        _pool = Workers(WORLD)
        atexit.register(_pool.close)
    return _pool


class Workers:
    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_serve, args=(r, world, port, self.tasks[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 90.0) -> list[Any]:
        """fn(*args) on every rank; each rank's return value, in rank order. Raises on any failure."""
        for q in self.tasks:
            q.put((fn, args))
        out: dict[int, Any] = {}
        failures = []
        try:
            while len(out) + len(failures) < self.world:
                rank, ok, value = self.results.get(timeout=timeout)
                if ok:
                    out[rank] = value
                else:
                    failures.append(f"rank {rank}:\n{value}")
        except queue.Empty:
            self.close()
            raise AssertionError(
                f"{fn.__name__} timed out after {timeout}s on ranks {sorted(set(range(self.world)) - set(out))}"
            ) from None
        if failures:
            raise AssertionError("\n".join(sorted(failures)))
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)


def _serve(rank: int, world: int, port: int, tasks: Any, results: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while True:
        task = tasks.get()
        if task is None:
            return
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # report everything, keep serving
            results.put((rank, False, traceback.format_exc()))


class TensorState:
    """A Stateful over a plain dict, the simplest thing a Checkpointer can be handed."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = dict(state_dict)
