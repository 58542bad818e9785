"""Making a checkpoint valid atomically, finding the newest valid one, and pruning.

A save is written under `<root>/.step-<n>.tmp-<token>/`. Only after every writer fsynced its chunks
does one process write the metadata, fsync it, write `COMMITTED` last, rename the folder to
`step-<n>` and fsync the root. A folder without `COMMITTED` is never taken for a checkpoint; a
`.tmp` folder left by a killed save is ignored; it is removed by the next save on its writer's host
(its `.owner` names a process that is gone) or else by a later successful commit.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

import crc32c

from ..errors import CheckpointError
from ..process import process_alive
from .fsio import fsync_dir, fsync_tree, write_file
from .metadata import COMMITTED_FILE, METADATA_FILE, CheckpointMeta
from .writer import io_error
from .zarr_meta import DOCUMENT, consolidated_root

_COMMITTED = re.compile(r"step-(\d{8,})")
_TMP = re.compile(r"\.step-(\d{8,})\.(tmp|old)-[0-9a-f]+")
OWNER_FILE = ".owner"  # in a save folder until its commit: the host and pid of the process that writes it


def step_dir(root: Path, step: int) -> Path:
    if step < 0:
        raise CheckpointError(f"step must be >= 0, got {step}")
    return Path(root) / f"step-{step:08d}"


def new_token() -> str:
    return secrets.token_hex(4)


def tmp_dir(root: Path, step: int, token: str) -> Path:
    return Path(root) / f".step-{step:08d}.tmp-{token}"


def begin(root: Path, *, step: int, token: str) -> Path:
    """Create the folder a save writes into (one process), after removing what killed saves left."""
    path = tmp_dir(root, step, token)
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        sweep(root)
        if path.exists():
            shutil.rmtree(path)  # a killed attempt under this very name
        path.mkdir()
        (path / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    except OSError as e:
        raise io_error(e, action=f"creating checkpoint folder {path}") from e
    return path


def sweep(root: Path) -> list[Path]:
    """Remove the partial saves whose writer on this host is gone (killed mid-save), so that a disk
    a killed save filled frees up before the next one. Saves of live writers, or of other hosts
    (whose processes cannot be asked), stay until a later commit prunes them."""
    removed = []
    for child in Path(root).iterdir():
        if not _TMP.fullmatch(child.name):
            continue
        try:
            owner = json.loads((child / OWNER_FILE).read_bytes())
        except (OSError, ValueError):
            continue  # being created, or left by a version that did not say
        if owner.get("host") == socket.gethostname() and not process_alive(int(owner.get("pid", 0))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def commit(directory: Path, *, meta: CheckpointMeta) -> Path:
    """Seal a fully written save folder as `step-<n>` (one process, after every writer finished)."""
    root = directory.parent
    final = step_dir(root, meta.step)
    try:
        write_file(directory / DOCUMENT, consolidated_root(meta.arrays, compression=meta.compression))
        document = json.dumps(meta.to_json(), indent=1, sort_keys=True).encode()
        write_file(directory / METADATA_FILE, document)
        fsync_tree(directory, files=(DOCUMENT,))
        marker = {"step": meta.step, "metadata_crc32c": crc32c.crc32c(document)}
        write_file(directory / COMMITTED_FILE, json.dumps(marker).encode())
        fsync_dir(directory)
        replaced = None
        if final.exists():
            replaced = root / f".step-{meta.step:08d}.old-{new_token()}"
            final.rename(replaced)
        directory.rename(final)
        (final / OWNER_FILE).unlink(missing_ok=True)  # kept until here: a save killed before the rename is swept
        fsync_dir(root)
    except OSError as e:
        raise io_error(e, action=f"committing checkpoint {final}") from e
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def committed(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _COMMITTED.fullmatch(child.name)
        if m and (child / COMMITTED_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest(root: Path) -> Path | None:
    """The newest committed checkpoint under `root`, None if there is none."""
    found = committed(root)
    return found[-1][1] if found else None


def prune(root: Path, *, keep: int, current: int) -> list[Path]:
    """Remove committed checkpoints beyond the newest `keep`, and stale partial saves up to `current`."""
    if keep < 1:
        raise CheckpointError(f"keep must be >= 1, got {keep}")
    removed = [path for _, path in committed(root)[:-keep]]
    for child in Path(root).iterdir():
        m = _TMP.fullmatch(child.name)
        # A partial save of a later step may still be in progress (e.g. a background persist).
        if m and int(m.group(1)) <= current:
            removed.append(child)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def abort(directory: Path) -> None:
    """Remove a failed save's folder; never touches committed checkpoints."""
    if _TMP.fullmatch(directory.name):
        shutil.rmtree(directory, ignore_errors=True)
