"""How state survives, a sub-package per level: `state/` (what state is and where each rank's piece
lives), `store/` (L3, the universal zarr store), `snapshot/` (L1, the worker's copy to host memory),
`keeper/` (the per-node process holding snapshots), `erasure/` (L2, parity across nodes) and
`recovery/` (the ladder a resume walks). The names below are what the trainer, the launchers and the
tests use; each is imported on first use, so that a process needing one part (the keeper starts in
milliseconds) does not import the others (torch, zarr)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # configuration and errors
    "CheckpointConfig": "config",
    "ErasureConfig": "config",
    "FaultConfig": "config",
    "SimulateConfig": "config",
    "CheckpointError": "errors",
    "NothingToResume": "errors",
    "PeerUnreachable": "errors",
    "SaveFailed": "errors",
    "WorldIncomplete": "errors",
    # what the trainer hands over, and the worker's side of every level
    "ModelState": "state.stateful",
    "OptimizerState": "state.stateful",
    "layout_of": "state.layout",
    "Comm": "comm",
    "Protection": "recovery.protection",
    "StageRebuild": "recovery.checkfree",
    "HeldSlots": "keeper.client",
    "prefetch_ahead": "recovery.peers",
    "previous_topology": "recovery.peers",
    # the keeper process and its node-level housekeeping
    "Keeper": "keeper.server",
    "KeeperRunning": "keeper.server",
    "run_id": "keeper.protocol",
    "node_keepers": "keeper.reclaim",
    "reclaim_stale": "keeper.reclaim",
    "process_alive": "process",
    "incarnation": "process",
    "store_attempt": "process",
    "launcher_pid": "process",
    "GENERATION_ENV": "process",
    "FENCED_ENV": "process",
    "exit_begun": "process",
    "wait_released": "process",
    # the store, for the command-line tools
    "Checkpoint": "store.reader",
    "verify": "store.reader",
    "latest": "store.commit",
    "describe": "store.tools",
    "diff": "store.tools",
    "plan_for_layouts": "store.tools",
    "export_safetensors": "store.safetensors_io",
    "DEFAULT_MAX_SHARD_BYTES": "store.safetensors_io",
    "DTYPES": "store.safetensors_io",
    # other frameworks' formats, in and out
    "NameMap": "store.name_map",
    "export_hf": "store.hf_io",
    "export_dcp": "store.dcp_io",
    "convert_dcp": "store.dcp_io",
    "convert_deepspeed": "store.deepspeed_io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
