"""What the trainer calls: save a dict of Stateful objects collectively, resume on any topology.

Saving: every rank flattens its states into named tensors (with placements) and JSON, the ranks
agree on one plan, rank 0 creates the arrays, every rank writes the chunks it owns, rank 0 commits.
Loading: every rank reads and checks the chunks its own tensors need (the templates from each
state's `state_dict()`); only when every rank read everything successfully are the chunks copied
into the templates and `load_state_dict` called, so a bad checkpoint changes nothing.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from ..comm import Comm, raise_failures
from ..config import CheckpointConfig
from ..errors import CheckpointError, join_problems
from ..state.dtypes import dtype_name, is_floating
from ..state.flatten import flatten, merge_trees, restore, state_templates
from ..state.layout import Fragment, fragment_of, local_data
from ..state.stateful import OptimizerState
from . import commit as commits
from .grid import DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_SHARD_BYTES
from .metadata import CheckpointMeta, StateTrees
from .reader import Checkpoint, check
from .save_plan import plan_save
from .writer import DEFAULT_IO_THREADS, HostFragment, create_arrays, write_fragments

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class DerivedState(Protocol):
    """A state that a checkpoint may lack and that rebuilds itself from the step instead: a checkpoint
    converted from another framework holds tensors and a step, not this trainer's data position."""

    def derive_from_step(self, step: int) -> None: ...


class Checkpointer:
    """Universal checkpoints of `states` under `root`; every method is collective over all ranks."""

    def __init__(
        self,
        config: CheckpointConfig,
        *,
        root: Path,
        states: Mapping[str, Stateful],
        topology: Mapping[str, Any] | None = None,
        strict: bool = True,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        io_threads: int = DEFAULT_IO_THREADS,
        progress: bool = False,
    ) -> None:
        for key in states:
            if not key or "/" in key:
                raise CheckpointError(f"state key {key!r} is empty or contains '/': rename it")
        self.config = config
        self.root = Path(root)
        self.states = dict(states)
        self.comm = Comm.create()
        self.topology = {**dict(topology or {}), "world_size": self.comm.world_size}
        self.strict = strict
        self.max_chunk_bytes = max_chunk_bytes
        self.max_shard_bytes = max_shard_bytes
        self.io_threads = io_threads
        self.progress = progress and self.comm.rank == 0

    def maybe_save(self, step: int) -> Path | None:
        """Save when `step` is a multiple of `config.every` (never when it is 0)."""
        if self.config.every > 0 and step % self.config.every == 0:
            return self.save(step)
        return None

    def save(self, step: int) -> Path:
        """Write a committed checkpoint of every state at `step`; the previous ones stay valid if it fails."""
        start = time.perf_counter()
        rank, comm = self.comm.rank, self.comm
        host: dict[str, HostFragment] = {}
        trees: dict[str, Any] = {}
        error = _attempt(lambda: self._collect(host, trees))
        fragments = [h.fragment.to_json() for h in host.values()]
        gathered = comm.all_gather({"error": error, "fragments": fragments, "state": trees if error is None else {}})
        raise_failures([g["error"] for g in gathered], action=f"saving step {step}")
        plan = plan_save(
            {r: [Fragment.from_json(f) for f in g["fragments"]] for r, g in enumerate(gathered)},
            world_size=comm.world_size,
            compression=self.config.compression,
            max_chunk_bytes=self.max_chunk_bytes,
            max_shard_bytes=self.max_shard_bytes,
        )
        token, error = commits.new_token(), None
        if rank == 0:
            error = _attempt(lambda: create_arrays(commits.begin(self.root, step=step, token=token), plan))
        token = comm.all_gather(token)[0]
        directory = commits.tmp_dir(self.root, step, token)
        try:
            comm.agree(error, action=f"saving step {step}")
            nbytes = _attempt(
                lambda: write_fragments(
                    directory, plan, rank=rank, sources=host, threads=self.io_threads, progress=self.progress
                )
            )
            comm.agree(nbytes if isinstance(nbytes, str) else None, action=f"saving step {step}")
            error = None
            if rank == 0:
                meta = CheckpointMeta.from_plan(
                    plan,
                    step=step,
                    topology=self.topology,
                    states=StateTrees.from_ranks([g["state"] for g in gathered]),
                )
                result = _attempt(lambda: commits.commit(directory, meta=meta))
                error = result if isinstance(result, str) else None
                if error is None:
                    commits.prune(self.root, keep=self.config.keep, current=step)
            comm.agree(error, action=f"committing step {step}")
        except CheckpointError as e:
            if rank == 0:
                commits.abort(directory)
            previous = commits.latest(self.root)
            raise CheckpointError(f"{e}\nthe previous checkpoint ({previous or 'none'}) is unchanged") from None
        final = commits.step_dir(self.root, step)
        if rank == 0:
            log.info("saved step %d to %s in %.2f s", step, final, time.perf_counter() - start)
        return final

    def _collect(self, host: dict[str, HostFragment], trees: dict[str, Any]) -> None:
        """This rank's tensors as host fragments, and its JSON state, by state key."""
        for key, state in self.states.items():
            tensors, trees[key] = flatten(key, state.state_dict())
            for name, tensor in tensors.items():
                host[name] = HostFragment(fragment_of(name, tensor, rank=self.comm.rank), _host_copy(tensor))

    def resume(self) -> int | None:
        """Load what `config.resume` names (none | latest | a path); the loaded step, None if nothing."""
        spec = self.config.resume
        if spec == "none":
            return None
        if spec == "latest":
            found = self.load_latest()
            if found is None:
                log.info("no committed checkpoint under %s: starting fresh", self.root)
                return None
            return found[0]
        return self.load(Path(spec))

    def load_latest(self) -> tuple[int, Path, list[str]] | None:
        """Load the newest committed checkpoint that loads (collective): one that fails its checks
        (damaged chunks or document, an interrupted copy) is skipped with its reason and an older one
        loaded instead, since a load changes no tensor until every rank checked every chunk it needs.
        (step, path, what was skipped); None when there is no committed checkpoint."""
        found = [str(p) for _, p in reversed(commits.committed(self.root))] if self.comm.rank == 0 else None
        skipped: list[str] = []
        newest: CheckpointError | None = None
        for path in map(Path, self.comm.all_gather(found)[0]):
            try:
                return self.load(path), path, skipped
            except CheckpointError as e:
                if self.comm.rank == 0:
                    log.warning("skipping checkpoint %s, which cannot be loaded: %s", path, e)
                skipped.append(f"{path.name} ({_reason(e)})")
                newest = newest or e
        if skipped:
            raise CheckpointError(
                f"no committed checkpoint under {self.root} can be loaded: {'; '.join(skipped)}. "
                "Restore a copy of the folder, or start over with checkpoint.resume=none. "
                f"The newest one's error: {newest}"
            )
        return None

    def load(self, path: Path) -> int:
        """Load a committed checkpoint into the states (resharding as needed); returns its step."""
        rank, comm = self.comm.rank, self.comm
        result = _attempt(lambda: Checkpoint.open(path))
        comm.agree(result if isinstance(result, str) else None, action=f"opening checkpoint {path}")
        ckpt: Checkpoint = result
        keys = [k for k, s in self.states.items() if self.config.load_optimizer or not isinstance(s, OptimizerState)]
        templates: dict[str, Any] = {}
        targets: dict[str, torch.Tensor] = {}
        error = _attempt(lambda: self._templates(keys, templates, targets))
        gathered = comm.all_gather({"error": error, "names": sorted(targets)})
        raise_failures([g["error"] for g in gathered], action=f"loading {path}")
        all_targets = {n for g in gathered for n in g["names"]}
        problems = _mismatches(ckpt.meta, targets, all_targets=all_targets, prefixes=keys, excluded=self._excluded)
        saved_trees = self._saved_trees(ckpt.meta)
        derived = [k for k in keys if k not in saved_trees and hasattr(self.states[k], "derive_from_step")]
        problems += [f"state {k!r} is not in the checkpoint" for k in keys if k not in saved_trees and k not in derived]
        if problems and self.strict:
            error = f"checkpoint {path} does not match the state being loaded:\n{join_problems(problems)}\n" + _ADVICE
        else:
            error = None
            if problems and rank == 0:
                log.warning("loading %s non-strictly; skipped:\n%s", path, join_problems(problems))
            targets = {n: t for n, t in targets.items() if _loadable(ckpt.meta, n, t)}
        comm.agree(error, action=f"loading {path}")
        checked = _attempt(
            lambda: check(
                ckpt,
                [fragment_of(n, t, rank=rank) for n, t in targets.items()],
                threads=self.io_threads,
                progress=self.progress,
            )
        )
        comm.agree(checked if isinstance(checked, str) else None, action=f"loading {path}")
        # Every rank checked every chunk it needs: only now do the targets change.
        with torch.no_grad():
            checked.apply({n: local_data(t) for n, t in targets.items()}, threads=self.io_threads)
        for key in keys:
            if key in saved_trees:
                self.states[key].load_state_dict(
                    restore(saved_trees[key], tensors=targets, template=templates[key], prefix=key)
                )
            elif key in derived:
                self.states[key].derive_from_step(ckpt.meta.step)
        if rank == 0:
            log.info("loaded step %d from %s", ckpt.meta.step, path)
            if derived:
                log.info("%s: not in the checkpoint, derived from step %d", ", ".join(derived), ckpt.meta.step)
        return ckpt.meta.step

    def _templates(self, keys: list[str], templates: dict[str, Any], targets: dict[str, torch.Tensor]) -> None:
        """Each state's current state_dict (the load template) and its tensors not excluded, by name."""
        found, tensors = state_templates({key: self.states[key] for key in keys})
        templates.update(found)
        targets.update({n: t for n, t in tensors.items() if not self._excluded(n)})

    def _excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.config.exclude)

    def _saved_trees(self, meta: CheckpointMeta) -> dict[str, Any]:
        """Saved rank r's JSON state on the same topology, else the union over ranks (rank 0 first)."""
        if not meta.states.trees:
            return {}
        if dict(meta.topology) == self.topology:
            return meta.states.of_rank(self.comm.rank)
        return merge_trees([meta.states.of_rank(r) for r in range(len(meta.states.rank_tree))])


_ADVICE = (
    "load with matching model/optimizer settings, exclude tensors with checkpoint.exclude (glob patterns), "
    "set checkpoint.load_optimizer=false to load weights only, or load non-strictly"
)


def _reason(error: CheckpointError) -> str:
    """The line of a load's error that says why: an agreed failure's first line is only its header."""
    lines = str(error).splitlines()
    cause = lines[1] if len(lines) > 1 and lines[0].endswith(" failed:") else lines[0]
    cause = cause.split("] ", 1)[1] if cause.startswith("[rank ") else cause
    return cause.removesuffix(":")


def _attempt(fn):
    """The result of `fn` (None stays None), or its error's message, so every rank is told instead
    of left waiting in the next collective."""
    try:
        return fn()
    except CheckpointError as e:
        return str(e)
    except Exception as e:  # an unexpected failure on one rank must not hang the others
        log.exception("checkpoint operation failed")
        return f"{type(e).__name__}: {e}"


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return local_data(tensor).cpu()


def _mismatches(
    meta: CheckpointMeta, targets: Mapping[str, torch.Tensor], *, all_targets: set[str], prefixes: list[str], excluded
) -> list[str]:
    problems = []
    for name, t in sorted(targets.items()):
        array = meta.arrays.get(name)
        if array is None:
            problems.append(f"{name}: missing from the checkpoint (expected shape {tuple(t.shape)})")
        elif not _loadable(meta, name, t):
            problems.append(
                f"{name}: saved {array.shape} {array.dtype}, expected {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            )
    for name in sorted(meta.arrays):
        if name.split("/", 1)[0] in prefixes and name not in all_targets and not excluded(name):
            problems.append(
                f"{name}: in the checkpoint (shape {meta.arrays[name].shape}) but not in the state being loaded"
            )
    return problems


def _loadable(meta: CheckpointMeta, name: str, target: torch.Tensor) -> bool:
    array = meta.arrays.get(name)
    if array is None or tuple(array.shape) != tuple(target.shape):
        return False
    dtype = dtype_name(target.dtype)
    return array.dtype == dtype or (is_floating(array.dtype) and is_floating(dtype))
