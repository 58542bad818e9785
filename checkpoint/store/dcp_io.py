"""torch.distributed.checkpoint (DCP) in and out: a torchtitan / FSDP2 x TP `dcp.save` folder
becomes a universal checkpoint, and a universal checkpoint becomes a DCP folder that `dcp.load`
reads on any topology.

DCP's `.metadata` is a plain pickle, which torch unpickles with no restriction, and its default load
planner unpickles non-tensor values with `weights_only=False`; here the first goes through an
allowlist of DCP's own classes and the second through `weights_only=True`. Tensors are read by
torch's own reader (already `weights_only`), a bounded group at a time, so converting a model larger
than host memory works. Names: model parameters are saved by FQN, bare (torchtitan) or under
`model.`; optimizer state under `optimizer.state.<fqn>.<field>` and its hyperparameters under
`optimizer.param_groups.<fqn>.<field>` (flattened, as torchtitan saves them) or
`optimizer.param_groups.<i>.<field>` (as `get_state_dict` returns them).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import pathlib
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_meta
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem
from tqdm import tqdm

from ..errors import CheckpointError
from ..state.dtypes import dtype_name, is_floating, torch_dtype
from ..state.flatten import flatten, merge_trees
from ..state.layout import TensorLayout
from . import commit as commits
from .fsio import replace_dir
from .metadata import CheckpointMeta, StateTrees
from .name_map import NameMap
from .reader import Checkpoint
from .safe_unpickle import UnsafePickle, load_pickle
from .safetensors_io import DTYPES, _read_whole
from .save_plan import SavePlan, plan_save
from .writer import HostFragment, create_arrays, io_error, write_fragments

log = logging.getLogger(__name__)

METADATA_FILE = ".metadata"
WHAT = "torch.distributed.checkpoint .metadata"
GROUP_BYTES = 1 << 30  # tensors read and written together when converting: bounds host memory
OPTIMIZER = "optimizer"
TORCHTITAN_EXTRAS = ("lr_scheduler", "dataloader", "train_state")  # state that is not the model's or optimizer's
# How a param group is computed on this machine, not what it optimizes: the resuming run's own values apply.
RUNTIME_GROUP_KEYS = frozenset({"params", "foreach", "fused", "capturable", "differentiable"})


def _allowed() -> dict[str, Any]:
    """What a DCP `.metadata` pickle may ask for: DCP's metadata classes, its file system's storage
    record, torch.Size, dtypes and the layout lookup (a torch.layout pickles as a call to it), and
    the path type of the checkpoint id."""
    allowed: dict[str, Any] = {
        f"{dcp_meta.__name__}.{cls.__name__}": cls
        for cls in (
            Metadata,
            MetadataIndex,
            StorageMeta,
            TensorStorageMetadata,
            BytesStorageMetadata,
            dcp_meta.ChunkStorageMetadata,
            dcp_meta.TensorProperties,
            dcp_meta._MEM_FORMAT_ENCODING,
        )
    }
    allowed["torch.distributed.checkpoint.filesystem._StorageInfo"] = _StorageInfo
    allowed["torch.Size"] = torch.Size
    allowed["torch.serialization._get_layout"] = torch.serialization._get_layout
    allowed.update({f"torch.{n}": v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    allowed["pathlib.PosixPath"] = pathlib.PosixPath
    return allowed


ALLOWED = _allowed()


# ---- reading a DCP folder ------------------------------------------------------------------------


def read_dcp_metadata(source: Path) -> Metadata:
    """The folder's `.metadata`, unpickled through the allowlist, its data files checked to exist."""
    source = Path(source)
    path = source / METADATA_FILE
    if not source.is_dir():
        raise CheckpointError(
            f"{source} is not a folder: pass the folder that dcp.save wrote (it holds {METADATA_FILE})"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{source} has no {METADATA_FILE}: not a torch.distributed.checkpoint folder, or its save did not finish"
        )
    meta = load_pickle(path, ALLOWED, what=WHAT)
    if not isinstance(meta, Metadata) or not isinstance(meta.storage_data, dict):
        raise CheckpointError(f"{path} holds a {type(meta).__name__}, not DCP metadata: the file is damaged")
    _check_files(source, meta)
    return meta


def _check_files(source: Path, meta: Metadata) -> None:
    """Every data file the metadata names is a regular file directly inside `source`: a name with a
    folder in it, or a symlink out of the folder, would make the reader open files elsewhere."""
    names = {str(getattr(info, "relative_path", "")) for info in meta.storage_data.values()}
    inside = source.resolve()
    for name in sorted(names):
        path = source / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(
                f"{source / METADATA_FILE} names data file {name!r}, which is not a file of its folder: "
                "refusing to read it; the file is damaged or crafted"
            )
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing: the DCP checkpoint is incomplete (its {METADATA_FILE} lists "
                f"{len(names)} data file(s)); copy the whole folder again"
            )
        if path.resolve().parent != inside:
            raise CheckpointError(f"{path} resolves to {path.resolve()}, outside {source} (a symlink): refusing it")


class _Reader(FileSystemReader):
    """torch's file-system reader, with the metadata read (once) through the allowlist."""

    def __init__(self, path: Path, meta: Metadata) -> None:
        super().__init__(path)
        self._meta = meta

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._meta.storage_meta is None:
            self._meta.storage_meta = StorageMeta()
        self._meta.storage_meta.load_id = self.load_id
        return self._meta


class _Planner(DefaultLoadPlanner):
    """The default planner over a flat dict of DCP keys, unpickling non-tensor values with
    `weights_only` (numbers, strings, tuples): the default one admits any class."""

    def __init__(self, source: Path) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.source = source

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        try:
            self.state_dict[key] = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            asked = re.search(r"GLOBAL (\S+)", str(e))
            raise UnsafePickle(
                f"{self.source}: the value {key!r} asks for {asked.group(1) if asked else 'a class'} outside "
                "what weights_only admits; refused, and nothing of it ran"
            ) from None


def _load(source: Path, meta: Metadata, state: dict[str, Any]) -> dict[str, Any]:
    """Fill `state` (DCP key -> empty full tensor, or None for a value) from the folder."""
    try:
        with _one_process():
            dcp.load(state, storage_reader=_Reader(source, meta), planner=_Planner(source), no_dist=True)
    except UnsafePickle:
        raise
    except Exception as e:  # DCP wraps every rank's failure in its own exception type
        unsafe = _cause(e, UnsafePickle)
        if unsafe is not None:
            raise unsafe from None
        missing = _cause(e, FileNotFoundError)
        if missing is not None:
            raise CheckpointError(f"{missing.filename} is missing: the DCP checkpoint is incomplete") from None
        raise CheckpointError(f"cannot read {source} as a DCP checkpoint ({type(e).__name__}: {e})") from None
    return state


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """DCP warns that it assumes one process, which is what is asked here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _cause(error: BaseException, kind: type[BaseException]) -> Any:
    """The first exception of `kind` in `error`'s chain, or in the per-rank failures DCP collects."""
    seen: list[BaseException] = [error]
    while seen:
        e = seen.pop()
        if isinstance(e, kind):
            return e
        seen += [c for c in (e.__cause__, e.__context__) if c is not None]
        for failure in getattr(e, "failures", {}).values():
            seen.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


# ---- what each DCP key is ------------------------------------------------------------------------


@dataclass
class _Layout:
    """The DCP keys of a checkpoint by role, with the other side's FQN each belongs to."""

    model: dict[str, str] = field(default_factory=dict)  # key -> fqn
    state: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (fqn, field)
    groups: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (fqn or group index, field)
    skipped: list[str] = field(default_factory=list)


def _classify(meta: Metadata) -> _Layout:
    planner = meta.planner_data if isinstance(meta.planner_data, Mapping) else {}
    out = _Layout()
    for key, entry in meta.state_dict_metadata.items():
        # The path in the saved state_dict's nesting: ("model", fqn) when the model was nested under
        # "model", (fqn,) when saved at the top (a bare FQN may itself begin with "model.").
        path = planner.get(key)
        parts = [str(p) for p in path] if isinstance(path, (tuple, list)) and path else [key]
        nested = len(parts) > 1
        top, rest = (parts[0], ".".join(parts[1:])) if nested else key.partition(".")[::2]
        tensor = isinstance(entry, TensorStorageMetadata)
        if top == OPTIMIZER and rest.startswith("state.") and tensor:
            fqn, _, name = rest.removeprefix("state.").rpartition(".")
            out.state[key] = (fqn, name)
        elif top == OPTIMIZER and rest.startswith("param_groups."):
            owner, _, name = rest.removeprefix("param_groups.").rpartition(".")
            out.groups[key] = (owner, name)
        elif tensor and nested and top == "model":
            out.model[key] = rest
        elif tensor and not nested and top not in (OPTIMIZER, *TORCHTITAN_EXTRAS):
            out.model[key] = key
        else:
            out.skipped.append(key)
    return out


def _param_groups(values: Mapping[str, Any], layout: _Layout) -> dict[str, dict[str, Any]]:
    """{fqn: hyperparameters} from either form DCP holds them in (by FQN, or by group index with
    the group's `params`); fields that describe how this machine computes are left out."""
    by_index: dict[str, dict[str, Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    for key, (owner, name) in layout.groups.items():
        if owner.isdigit():  # a group's index: an FQN is never a bare number
            by_index.setdefault(owner, {})[name] = values[key]
        else:
            out.setdefault(owner, {})[name] = values[key]
    for group in by_index.values():
        for fqn in group.get("params", []):
            out.setdefault(str(fqn), {}).update(group)
    return {fqn: {k: _json(v) for k, v in g.items() if k not in RUNTIME_GROUP_KEYS} for fqn, g in out.items()}


def _json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    return value


# ---- convert: DCP -> universal -------------------------------------------------------------------


def convert_dcp(
    source: Path,
    out: Path,
    *,
    name_map: Path | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the model and optimizer state of the DCP folder `source` as a universal checkpoint under
    the checkpoint root `out`, at the optimizer's step; returns the step folder.

    Arrays are named as the trainer names them (`model/<fqn>`, `optim/state/<fqn>/exp_avg`), so a run
    resumes from it with `checkpoint.resume=PATH`; the data position and train progress, which a DCP
    folder of another trainer does not hold, are derived from the step by the resuming trainer."""
    source, out = Path(source), Path(out)
    meta = read_dcp_metadata(source)
    layout = _classify(meta)
    if not layout.model and not layout.state:
        raise CheckpointError(
            f"{source} holds no model or optimizer tensors (keys: {sorted(meta.state_dict_metadata)[:5]})"
        )
    if layout.skipped:
        log.info("not converted (neither model nor optimizer state): %s", ", ".join(sorted(layout.skipped)))
    names = NameMap.from_file(name_map) if name_map is not None else NameMap.identity()
    ours = names.translate_all({*layout.model.values(), *(fqn for fqn, _ in layout.state.values())})
    small = _load(source, meta, {k: None for k in layout.groups} | _empty(meta, _steps(layout)))
    step = _step(small, layout, source=source)
    groups = {ours.get(fqn, fqn): g for fqn, g in _param_groups(small, layout).items() if fqn in ours}
    # our array name -> (DCP key, their FQN)
    targets = {f"model/{ours[fqn]}": (key, fqn) for key, fqn in layout.model.items()}
    targets |= {f"optim/state/{ours[fqn]}/{name}": (key, fqn) for key, (fqn, name) in layout.state.items()}
    trees = _trees(meta, layout, ours=ours, groups=groups)
    final = commits.step_dir(out, step)
    if final.exists() and not overwrite:
        raise CheckpointError(
            f"{final} already exists: choose another checkpoint root, or pass --overwrite to replace it"
        )

    def read(group: list[str]) -> dict[str, torch.Tensor]:
        loaded = _load(source, meta, _empty(meta, [targets[n][0] for n in group]))
        return {n: names.to_resurgo(targets[n][1], loaded[targets[n][0]])[1] for n in group}

    shapes = {n: _shape_dtype(meta.state_dict_metadata[key]) for n, (key, _) in targets.items()}
    return write_universal(
        out, step=step, shapes=shapes, trees=trees, read=read, topology={"converted_from": "dcp"}, progress=progress
    )


def _steps(layout: _Layout) -> list[str]:
    return [k for k, (_, name) in layout.state.items() if name == "step"]


def _empty(meta: Metadata, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    out = {}
    for key in keys:
        shape, dtype = _shape_dtype(meta.state_dict_metadata[key])
        out[key] = torch.empty(shape, dtype=torch_dtype(dtype))
    return out


def _shape_dtype(entry: Any) -> tuple[tuple[int, ...], str]:
    return tuple(int(s) for s in entry.size), dtype_name(entry.properties.dtype)


def _step(values: Mapping[str, Any], layout: _Layout, *, source: Path) -> int:
    """The optimizer's step (all parameters' agree after a plain run); 0 without optimizer state."""
    steps = {int(values[k].item()) for k in _steps(layout)}
    if len(steps) > 1:
        log.warning("%s: parameters have different optimizer steps %s; the checkpoint takes the largest", source, steps)
    return max(steps, default=0)


def _trees(
    meta: Metadata, layout: _Layout, *, ours: Mapping[str, str], groups: Mapping[str, dict[str, Any]]
) -> dict[str, Any]:
    """The JSON trees the trainer's model and optimizer states produce, tensors as references."""
    model = {ours[fqn]: _meta_tensor(meta, key) for key, fqn in layout.model.items()}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, (fqn, name) in layout.state.items():
        state.setdefault(ours[fqn], {})[name] = _meta_tensor(meta, key)
    trees = {}
    if model:
        trees["model"] = flatten("model", model)[1]
    if state:
        trees["optim"] = flatten("optim", {"state": state, "param_groups": dict(groups)})[1]
    return trees


def _meta_tensor(meta: Metadata, key: str) -> torch.Tensor:
    shape, dtype = _shape_dtype(meta.state_dict_metadata[key])
    return torch.empty(shape, dtype=torch_dtype(dtype), device="meta")


def write_universal(
    root: Path,
    *,
    step: int,
    shapes: Mapping[str, tuple[tuple[int, ...], str]],
    trees: Mapping[str, Any],
    read: Callable[[list[str]], Mapping[str, torch.Tensor]],
    topology: Mapping[str, Any],
    progress: bool = False,
    group_bytes: int = GROUP_BYTES,
) -> Path:
    """A committed universal checkpoint of `shapes` (name -> (shape, dtype)) at `step` under `root`,
    written by this one process through the same plan, writer and commit as a save; the tensors come
    from `read(names)` a bounded group at a time. An existing step folder is replaced at commit."""
    fragments = {n: TensorLayout(n, shape, dtype).fragment(0) for n, (shape, dtype) in shapes.items()}
    plan = plan_save({0: list(fragments.values())}, world_size=1)
    directory = commits.begin(root, step=step, token=commits.new_token())
    try:
        create_arrays(directory, plan)
        with tqdm(total=len(shapes), unit="tensor", desc="convert", disable=not progress) as bar:
            for group in _groups(plan, limit=group_bytes):
                tensors = read(group)
                host = {n: HostFragment(fragments[n], _contiguous(tensors[n], shapes[n], name=n)) for n in group}
                subplan = SavePlan({n: plan.arrays[n] for n in group}, world_size=1, compression=plan.compression)
                write_fragments(directory, subplan, rank=0, sources=host)
                bar.update(len(group))
        meta = CheckpointMeta.from_plan(
            plan, step=step, topology={**topology, "world_size": 1}, states=StateTrees.from_ranks([dict(trees)])
        )
        return commits.commit(directory, meta=meta)
    except BaseException:
        commits.abort(directory)
        raise


def _groups(plan: SavePlan, *, limit: int) -> Iterator[list[str]]:
    group: list[str] = []
    size = 0
    for name, array in sorted(plan.arrays.items()):
        nbytes = math.prod(array.shape) * array.itemsize
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


def _contiguous(tensor: torch.Tensor, expected: tuple[tuple[int, ...], str], *, name: str) -> torch.Tensor:
    shape, dtype = expected
    if tuple(tensor.shape) != shape or dtype_name(tensor.dtype) != dtype:
        raise CheckpointError(f"{name}: read {tuple(tensor.shape)} {tensor.dtype}, its metadata says {shape} {dtype}")
    return tensor.detach().cpu().contiguous()


# ---- export: universal -> DCP --------------------------------------------------------------------


def export_dcp(
    checkpoint: Checkpoint,
    out: Path,
    *,
    dtype: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint's model and optimizer state as a DCP folder under torchtitan's names
    (model by bare FQN, `optimizer.state.<fqn>.<field>`, `optimizer.param_groups.<fqn>.<field>`),
    full tensors from one process, which `dcp.load` reshards onto any topology.

    `dtype` casts the model's floating tensors only: optimizer moments and steps keep their precision,
    which resuming needs. `dcp.save` takes one state dict, so the whole state is in host memory at
    once. Written into a temporary folder beside `out`, renamed into place once complete; a non-empty
    `out` is replaced only with `overwrite`."""
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not known: choose one of {sorted(DTYPES)}")
    cast = torch_dtype(DTYPES[dtype]) if dtype else None
    names = sorted(n for n in checkpoint.meta.arrays if n.startswith(("model/", "optim/state/")))
    if not any(n.startswith("model/") for n in names):
        raise CheckpointError(f"{checkpoint.path} has no model tensors: nothing to export")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file: export into a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} is not empty: choose an empty or new folder, or pass --overwrite to replace it")
    state = _dcp_state(checkpoint, names, cast=cast, progress=progress)
    tmp = out.parent / f".{out.name}.tmp-{commits.new_token()}"
    try:
        tmp.mkdir(parents=True)
        with _one_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=True), no_dist=True)
        replace_dir(tmp, out, token=commits.new_token())
    except OSError as e:
        raise io_error(e, action=f"exporting to {out}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dcp_state(checkpoint: Checkpoint, names: list[str], *, cast: torch.dtype | None, progress: bool) -> dict[str, Any]:
    """torchtitan's layout: the model's FQNs at the top, the flattened optimizer state under "optimizer"."""
    state: dict[str, Any] = {}
    optimizer: dict[str, Any] = {}
    for name in tqdm(names, unit="tensor", desc="export", disable=not progress):
        tensor = _read_whole(checkpoint, name)
        if name.startswith("model/"):
            if cast is not None and is_floating(checkpoint.meta.arrays[name].dtype):
                tensor = tensor.to(cast)
            state[name.removeprefix("model/")] = tensor
        else:
            fqn, field_name = name.removeprefix("optim/state/").rsplit("/", 1)
            optimizer[f"state.{fqn}.{field_name}"] = tensor
    for fqn, group in _saved_groups(checkpoint).items():
        for key, value in group.items():
            optimizer[f"param_groups.{fqn}.{key}"] = tuple(value) if isinstance(value, list) else value
    if optimizer:
        state[OPTIMIZER] = optimizer
    return state


def _saved_groups(checkpoint: Checkpoint) -> dict[str, dict[str, Any]]:
    """Each parameter's optimizer hyperparameters, over every saving rank's JSON state."""
    meta = checkpoint.meta
    if not meta.states.trees:
        return {}
    merged = merge_trees([meta.states.of_rank(r) for r in range(len(meta.states.rank_tree))])
    groups = (merged.get("optim") or {}).get("param_groups") or {}
    # A converted checkpoint leaves out how its source computed; a loader's AdamW asks for every key.
    defaults = {k: v for k, v in torch.optim.AdamW([torch.zeros(1)]).defaults.items() if k in RUNTIME_GROUP_KEYS}
    return {fqn: defaults | {k: v for k, v in g.items() if k != "params"} for fqn, g in groups.items()}
