"""The keeper's background writer: from snapshots in host memory to committed universal checkpoints.

It uses the store's layers, so no training process is involved: the plan comes from every rank's
fragments (published once per run incarnation as JSON files, so keepers on several nodes agree
without talking), each keeper writes the chunks its local ranks own straight from shared memory and
then a per-rank done file (fsynced, carrying the rank's JSON state); the keeper holding global rank
0 commits (metadata, fsync, COMMITTED last) once every rank's done file exists. Coordination files
live in `<root>/.keeper-<token>/`, outside the zarr folder.

A failed attempt (a full disk, a permission, an I/O error) is not left to look like a save in
progress: its keeper removes what it wrote and drops a `failed-<step>.<attempt>` note, so that the
keepers waiting for it give up at once instead of at their deadline; every keeper then retries the
step as a new attempt (its own folder and coordination files) up to `retries` times, and reports the
step failed, with the reason, when the last attempt fails.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..state.dtypes import storage_dtype
from ..state.layout import Fragment
from ..store import commit as commits
from ..store.fsio import fsync_dir, write_file
from ..store.metadata import CheckpointMeta, StateTrees
from ..store.save_plan import ArrayPlan, SavePlan, plan_save
from ..store.writer import DEFAULT_IO_THREADS, HostFragment, create_arrays, write_fragments
from .protocol import StoreTarget
from .slots import PersistJob, RankData

log = logging.getLogger(__name__)

POLL_S = 0.02
RETRIES = 2  # further attempts at a step whose persist failed (a transient I/O error)
RETRY_WAIT_S = 1.0  # before attempt n, n times this


class Persister:
    """One background thread writing jobs in order; `on_done(job, phase, error)` reports progress."""

    def __init__(
        self,
        *,
        on_done: Callable[[PersistJob, str, str | None], None],
        timeout_s: float = 600.0,
        io_threads: int = DEFAULT_IO_THREADS,
        is_current: Callable[[str], bool] = lambda token: True,
        retries: int = RETRIES,
        retry_wait_s: float = RETRY_WAIT_S,
    ) -> None:
        self.on_done, self.timeout_s, self.io_threads = on_done, timeout_s, io_threads
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self.is_current = is_current  # False once the run incarnation (token) that asked for a persist ended
        self._jobs: queue.Queue[PersistJob | None] = queue.Queue()
        self._plans: dict[str, SavePlan] = {}
        self._thread = threading.Thread(target=self._run, name="resurgo-persist", daemon=True)
        self._thread.start()

    def submit(self, job: PersistJob) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            error = ""
            for attempt in range(self.retries + 1):
                if attempt:
                    time.sleep(self.retry_wait_s * attempt)
                try:
                    self.persist(job, attempt=attempt)
                    error = ""
                    break
                except Exception as e:  # a failed persist must not stop later ones
                    error = str(e)
                    log.error(
                        "persisting step %d to %s failed (attempt %d of %d): %s",
                        job.step,
                        job.target.root,
                        attempt + 1,
                        self.retries + 1,
                        e,
                    )
                    self._abandon(job, attempt, error)
                    if not self.is_current(job.target.token):
                        break  # the run restarted: the new incarnation persists its own steps
            if error:
                self.on_done(job, "failed", f"step {job.step} could not be written to {job.target.root}: {error}")

    def persist(self, job: PersistJob, *, attempt: int = 0) -> None:
        start = time.perf_counter()
        target = job.target
        plan = self._plan(job)
        tmp = _attempt_dir(target, job.step, attempt)
        ready = target.coord / f"ready-{job.step}.{attempt}.json"
        if job.committer:
            create_arrays(commits.begin(Path(target.root), step=job.step, token=_attempt_token(target, attempt)), plan)
            _write_json(ready, {"step": job.step})
        else:
            self._wait_for(job, [ready], attempt=attempt, what=f"the committing keeper to create step {job.step}")
        nbytes = 0
        for rank, held in sorted(job.ranks.items()):
            nbytes += write_fragments(tmp, plan, rank=rank, sources=_host_fragments(held), threads=self.io_threads)
            _write_json(
                _done_file(target, job.step, attempt, rank), {"rank": rank, "step": job.step, "state": held.tree}
            )
        self.on_done(job, "durable", None)
        if job.committer:
            self._commit(job, plan, tmp, attempt=attempt)
            log.info(
                "keeper committed step %d (%.1f MB from memory) in %.2f s",
                job.step,
                nbytes / 1e6,
                time.perf_counter() - start,
            )
            self.on_done(job, "committed", None)

    def _abandon(self, job: PersistJob, attempt: int, error: str) -> None:
        """After a failed attempt: its folder goes (the committer's), the other keepers learn why
        (best effort: on a full disk the note fits once the folder is gone)."""
        target = job.target
        if job.committer:
            commits.abort(_attempt_dir(target, job.step, attempt))
        for path in _coord_files(target, f"{job.step}.{attempt}"):
            path.unlink(missing_ok=True)
        try:
            _write_json(_failed_file(target, job.step, attempt), {"step": job.step, "error": error})
        except OSError as e:
            log.warning(
                "could not tell the other keepers that step %d failed (%s): they give up at their deadline", job.step, e
            )

    def _commit(self, job: PersistJob, plan: SavePlan, tmp: Path, *, attempt: int) -> None:
        target = job.target
        done = [_done_file(target, job.step, attempt, r) for r in range(target.world_size)]
        self._wait_for(job, done, attempt=attempt, what=f"every rank's fragments of step {job.step}")
        trees = [json.loads(p.read_bytes())["state"] for p in done]
        topology = {**dict(target.topology), "world_size": target.world_size}
        meta = CheckpointMeta.from_plan(plan, step=job.step, topology=topology, states=StateTrees.from_ranks(trees))
        try:
            commits.commit(tmp, meta=meta)
        except CheckpointError:
            commits.abort(tmp)
            raise
        for path in _coord_files(target, f"{job.step}"):  # every attempt's
            path.unlink(missing_ok=True)
        commits.prune(Path(target.root), keep=target.keep, current=job.step)

    def _plan(self, job: PersistJob) -> SavePlan:
        """The run incarnation's plan: every rank publishes its fragments, the committer plans once."""
        target = job.target
        if target.token in self._plans:
            return self._plans[target.token]
        target.coord.mkdir(parents=True, exist_ok=True)
        for rank, held in job.ranks.items():
            _write_json(target.coord / f"fragments-{rank}.json", [e.fragment for e in held.layout.entries])
        plan_file = target.coord / "plan.json"
        if job.committer and not plan_file.exists():
            files = [target.coord / f"fragments-{r}.json" for r in range(target.world_size)]
            self._wait_for(job, files, what="every rank's snapshot layout")
            fragments = {r: [Fragment.from_json(f) for f in json.loads(p.read_bytes())] for r, p in enumerate(files)}
            plan = plan_save(fragments, world_size=target.world_size, compression=target.compression)
            _write_json(plan_file, _plan_to_json(plan))
            _remove_other_incarnations(target)
        self._wait_for(job, [plan_file], what="the committing keeper's save plan")
        self._plans[target.token] = _plan_from_json(json.loads(plan_file.read_bytes()))
        return self._plans[target.token]

    def _wait_for(self, job: PersistJob, paths: list[Path], *, what: str, attempt: int | None = None) -> None:
        """Until `paths` exist; gives up when the run restarted, or when another keeper's attempt failed."""
        failed = _failed_file(job.target, job.step, attempt) if attempt is not None else None
        _wait_for(
            paths, timeout_s=self.timeout_s, what=what, alive=lambda: self.is_current(job.target.token), failed=failed
        )


def _host_fragments(held: RankData) -> dict[str, HostFragment]:
    out = {}
    for entry in held.layout.entries:
        raw = held.data[entry.offset : entry.offset + entry.nbytes]
        array = raw.view(storage_dtype(entry.dtype)).reshape(entry.shape)
        out[entry.name] = HostFragment(Fragment.from_json(entry.fragment), array)
    return out


def _attempt_token(target: StoreTarget, attempt: int) -> str:
    """Names one attempt's temporary folder (hex, as commit's cleanup expects)."""
    return f"{target.token}{attempt:02x}"


def _attempt_dir(target: StoreTarget, step: int, attempt: int) -> Path:
    return commits.tmp_dir(Path(target.root), step, _attempt_token(target, attempt))


def _done_file(target: StoreTarget, step: int, attempt: int, rank: int) -> Path:
    return target.coord / f"done-{step}.{attempt}.{rank}.json"


def _failed_file(target: StoreTarget, step: int, attempt: int) -> Path:
    return target.coord / f"failed-{step}.{attempt}.json"


def _coord_files(target: StoreTarget, prefix: str) -> list[Path]:
    """The ready, done and failed files of a step ("<step>") or of one attempt ("<step>.<attempt>"); not
    another keeper's file still being written (`_write_json`'s partial: removing it would fail that
    keeper's write with a missing file instead of the failure being reported)."""
    found = (p for kind in ("ready", "done", "failed") for p in target.coord.glob(f"{kind}-{prefix}.*"))
    return [p for p in found if p.suffix == ".json"]


def _write_json(path: Path, obj: Any) -> None:
    """Atomically: a reader sees the whole document or none."""
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    write_file(partial, json.dumps(obj).encode())
    os.replace(partial, path)
    fsync_dir(path.parent)


def _wait_for(
    paths: list[Path],
    *,
    timeout_s: float,
    what: str,
    alive: Callable[[], bool] = lambda: True,
    failed: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if failed is not None and failed.exists():
            try:
                reason = json.loads(failed.read_bytes())["error"]
            except (OSError, ValueError, KeyError):
                reason = "no reason recorded"
            raise CheckpointError(f"another keeper failed this attempt while this one waited for {what}: {reason}")
        if not alive():
            raise CheckpointError(
                f"abandoned waiting for {what}: the run restarted (a rank died) before every rank wrote it"
            )
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise CheckpointError(
                f"gave up waiting {timeout_s:.0f} s for {what} (missing {missing[:5]}): a keeper on another node "
                "is gone or the file system is not shared between nodes; checkpoint.dir must be on shared storage"
            )
        time.sleep(POLL_S)


def _plan_to_json(plan: SavePlan) -> dict[str, Any]:
    return {
        "world_size": plan.world_size,
        "compression": plan.compression,
        "arrays": {n: a.to_json() for n, a in plan.arrays.items()},
    }


def _plan_from_json(data: Mapping[str, Any]) -> SavePlan:
    arrays = {str(n): ArrayPlan.from_json(str(n), a) for n, a in data["arrays"].items()}
    return SavePlan(arrays, int(data["world_size"]), str(data["compression"]))


def _remove_other_incarnations(target: StoreTarget) -> None:
    for child in Path(target.root).glob(".keeper-*"):
        if child != target.coord:
            shutil.rmtree(child, ignore_errors=True)
