"""Warm restarts: the process torchrun starts for a rank stays up; its training runs in a forked child.

A cold restart pays for the interpreter, `import torch`, the lazy imports of FSDP2's first call and
the rendezvous, once per failure: seconds, where the restore from memory takes a tenth of one. Here
the process torchrun starts (the supervisor) pays them once: it imports everything training needs and
composes the config (Hydra, half a second), then forks the rank's real process (the worker). When a worker dies (a crash, or its keeper ending
it because it or a peer hung), its supervisor opens a new generation in the workers' store; every
supervisor that sees the new generation kills its own worker (a worker left in a collective with a
dead peer would wait there for the process-group timeout) and forks a fresh one, which joins a
process group under the new generation's store prefix, restores from memory and goes on. A worker of
an older generation runs no more code when its successor starts (every thread of it is in the
kernel's exit path; the kernel then frees its memory, about 0.1 s per GiB, while the successor
starts, and it is reaped after), and the groups of two generations never share a key, so an older
worker can neither join nor write into a newer one.

On several nodes, a lost node changes the world, which only torchrun's re-rendezvous can agree on:
the keepers that notice it end the supervisors too, and torchrun restarts them.

torchrun's own restart stays the last resort: a worker that ends with an error while no generation
opened (a wrong config, nothing to resume) ends its supervisor with the same code, as do more than
`RESURGO_MAX_WARM_RESTARTS` warm restarts; a dead supervisor takes its worker with it (the worker
asks the kernel for SIGKILL on its parent's death). RESURGO_WARM_RESTARTS=0 turns this off.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from resurgo.checkpoint import FENCED_ENV, GENERATION_ENV, exit_begun, store_attempt

from .process_tree import STORE_NAME, die_with_parent, exit_now, name_this_process, worker_name
from .warm_template import say

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # where torchrun reads a failed worker's error (`@record`)
POLL_S = 0.02  # how often a supervisor looks at its worker and at the generation
# After a worker's error exit, how long to wait for a peer's failure to open a generation: a dead
# peer's supervisor opens one within a poll or two of its death, before a survivor's failed collective
# has unwound and exited. Nothing opens one after a lost node, whose wait delays torchrun's restart.
GRACE_S = 0.5
STORE_TIMEOUT_S = 30.0
FENCE_S = 10.0  # how long a SIGKILLed worker may take to stop running (a thread in an uninterruptible wait)
FINISH_S = 60.0  # at the end, how long the store's host waits for the other ranks' workers to finish


def enabled() -> bool:
    """Under torchrun on Linux, unless RESURGO_WARM_RESTARTS=0."""
    return (
        "TORCHELASTIC_RUN_ID" in os.environ
        and "MASTER_ADDR" in os.environ
        and os.environ.get("RESURGO_WARM_RESTARTS", "1") != "0"
        and sys.platform == "linux"
    )


class StoreGone(Exception):
    """The job's store stopped answering: its host went with the job's other processes."""


class Generations:
    """The job's current generation, a counter in the workers' store that any supervisor may advance.

    That store must outlive every worker: torchrun's agent's where the agent shares it (one node),
    else (several nodes, each round's store published afresh) a process rank 0's supervisor forks
    for it at the address torchrun gave the workers, which lives as long as that supervisor does.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.world_size = int(os.environ["WORLD_SIZE"])
        self.host = 0
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and int(os.environ.get("RANK", "0")) == 0:
            self.host = _host_store(int(os.environ["MASTER_PORT"]))
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            self.world_size,
            is_master=False,
            timeout=timedelta(seconds=STORE_TIMEOUT_S),
        )
        self.key = f"resurgo/warm/attempt_{store_attempt()}/generation"
        self.store.compare_set(self.key, "", "0")  # the first supervisor to get here creates it

    def current(self) -> int:
        """The generation now; StoreGone when the store went away (torchrun is stopping the job)."""
        try:
            return int(self.store.get(self.key))
        except (RuntimeError, OSError) as e:  # torch's DistNetworkError and DistStoreError are RuntimeErrors
            raise StoreGone(str(e)) from None

    def advance(self, past: int) -> int:
        """Open the generation after `past` (unless someone did already) and return the current one."""
        return int(self.store.compare_set(self.key, str(past), str(past + 1)))

    def finished(self) -> None:
        """This rank's worker finished: the store host waits for every rank's before it goes, since a
        supervisor whose worker still runs would take the store's going for a failure."""
        key = f"{self.key}/finished"
        try:
            self.store.add(key, 1)
            deadline = time.monotonic() + FINISH_S
            while self.host and self.store.add(key, 0) < self.world_size and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except (RuntimeError, OSError):
            pass  # the store is gone already: nothing left to wait for
        if self.host:
            _kill(self.host)


def _host_store(port: int) -> int:
    """Fork the process that serves the workers' store on `port`; it dies with this one."""
    import torch.distributed as dist

    pid = os.fork()
    if pid:
        return pid
    try:
        die_with_parent()
        name_this_process(STORE_NAME)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        store = dist.TCPStore(  # noqa: F841  served by its own thread while referenced
            os.environ["MASTER_ADDR"],
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=STORE_TIMEOUT_S),
        )
        while True:
            signal.pause()
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)


def supervise(run: Callable[[], None]) -> int:
    """Run `run` (the whole training entry point) in forked workers until one ends for good; the code."""
    preload()
    generations = Generations()
    most = int(os.environ.get("RESURGO_MAX_WARM_RESTARTS", "100"))
    gen, restarts = generations.current(), 0
    child = None
    dying: set[int] = set()  # fenced workers the kernel is still freeing; reaped as they end
    signal.signal(signal.SIGTERM, lambda *_: _stop(child))
    while True:
        child = _fork(run, gen, dying)
        try:
            outcome = _watch(child, gen, generations, dying)
        except StoreGone as e:
            _kill(child)
            _say(f"the job's store is gone ({e}): leaving the restart to torchrun")
            return 1
        if outcome.code is not None:
            _reap(dying, wait_s=FENCE_S)
            if outcome.code == 0:
                generations.finished()
            else:
                _hand_over_error_file()
            return outcome.code
        restarts += 1
        if restarts > most:
            _say(f"more than {most} warm restarts: leaving it to torchrun (RESURGO_MAX_WARM_RESTARTS)")
            return 1
        gen = outcome.generation
        if ERROR_FILE_ENV in os.environ:
            _worker_error_file().unlink(missing_ok=True)  # a fenced worker's, not the next one's
        _say(f"warm restart {restarts}, generation {gen}: {outcome.why}")


def _worker_error_file() -> Path:
    """Where a worker records its error: beside torchrun's file, never in it. A worker killed while
    writing leaves the file empty, and torchrun's agent dies on an error file it cannot parse; the
    supervisor hands torchrun the file only when it ends, and only whole."""
    return Path(os.environ[ERROR_FILE_ENV] + ".worker")


def _hand_over_error_file() -> None:
    """Give torchrun the last worker's error, if it recorded one and the record is whole."""
    if ERROR_FILE_ENV not in os.environ:
        return
    worker = _worker_error_file()
    try:
        json.loads(worker.read_text())
        os.replace(worker, os.environ[ERROR_FILE_ENV])
    except (OSError, ValueError):
        worker.unlink(missing_ok=True)


def preload() -> None:
    """Import, once, what every worker would otherwise import after each failure."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  FSDP2's first fully_shard imports it lazily (about 2 s)
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.pipelining  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401


class _Outcome:
    def __init__(self, *, code: int | None = None, generation: int = 0, why: str = "") -> None:
        self.code, self.generation, self.why = code, generation, why


def _fork(run: Callable[[], None], gen: int, dying: set[int]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        die_with_parent()
        name_this_process(worker_name(int(os.environ.get("LOCAL_RANK", "0"))))
        os.environ[GENERATION_ENV] = str(gen)
        os.environ[FENCED_ENV] = ",".join(map(str, sorted(dying)))  # a CUDA worker waits for their memory
        if ERROR_FILE_ENV in os.environ:
            os.environ[ERROR_FILE_ENV] = str(_worker_error_file())
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        run()
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        exit_now(code)


def _watch(child: int, gen: int, generations: Generations, dying: set[int]) -> _Outcome:
    """Wait until the worker ends or a new generation opens; in both cases the worker runs no more
    code on return (it joins `dying` until reaped)."""
    while True:
        _reap(dying)
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            return _ended(status, gen, generations)
        status = exit_begun(child)  # ended, its memory still being freed: no need to wait for that
        if status is not None:
            dying.add(child)
            return _ended(status, gen, generations)
        now = generations.current()
        if now != gen:
            _fence(child, dying)
            return _Outcome(generation=now, why="a rank of another node or process failed: this one was fenced")
        time.sleep(POLL_S)


def _ended(status: int, gen: int, generations: Generations) -> _Outcome:
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        return _Outcome(generation=generations.advance(gen), why=f"this node's worker ended by {sig}")
    code = os.WEXITSTATUS(status)
    if code == 0:
        return _Outcome(code=0)
    # An error exit is this worker's own verdict, unless a peer's failure caused it (a collective
    # with a dead peer fails): that peer's supervisor opens a generation within milliseconds.
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        now = generations.current()
        if now != gen:
            return _Outcome(generation=now, why=f"the worker exited with {code} after another rank failed")
        time.sleep(POLL_S)
    return _Outcome(code=code)


def _fence(pid: int, dying: set[int]) -> None:
    """SIGKILL a worker and return once it runs no more code, not once the kernel freed its memory."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    dying.add(pid)
    deadline = time.monotonic() + FENCE_S
    while pid in dying and exit_begun(pid) is None:
        if time.monotonic() > deadline:  # SIGKILL is pending: it can never run its own code again
            _say(f"worker pid {pid} has not begun to exit {FENCE_S:.0f} s after SIGKILL (a wait in the kernel)")
            return
        time.sleep(0.001)
        _reap(dying)


def _reap(dying: set[int], *, wait_s: float = 0.0) -> None:
    """Reap the workers of `dying` that ended, waiting up to `wait_s` for the rest."""
    deadline = time.monotonic() + wait_s
    while dying:
        for pid in list(dying):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    dying.discard(pid)
            except ChildProcessError:
                dying.discard(pid)
        if not dying or time.monotonic() >= deadline:
            return
        time.sleep(POLL_S)


def _kill(pid: int) -> None:
    """SIGKILL (a stopped or hung process takes no other signal) and reap, if not done already."""
    if pid <= 0:
        raise ValueError(f"pid {pid} names a process group, not a child")
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _stop(child: int | None) -> None:
    """torchrun stops its workers: stop this one's worker too, then go."""
    if child is not None:
        try:
            os.kill(child, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and os.waitpid(child, os.WNOHANG)[0] == 0:
                time.sleep(POLL_S)
        except (ProcessLookupError, ChildProcessError):
            pass
        _kill(child)
    os._exit(128 + signal.SIGTERM)


def _say(message: str) -> None:
    """One line on stderr, from every rank (a worker's logging is rank 0's alone)."""
    say("resurgo.warm", f"rank {os.environ.get('RANK', '?')}: {message}")
