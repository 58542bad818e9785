"""Damaged or mismatched checkpoints fail with an error naming what is wrong and what to do, and
nothing is loaded; failed saves leave the previous checkpoint as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
from test_ckpt_workers import TensorState

from resurgo.checkpoint.errors import CheckpointError
from resurgo.checkpoint.store import commit
from resurgo.checkpoint.store import writer as store
from resurgo.checkpoint.store.checkpointer import Checkpointer
from resurgo.checkpoint.store.commit import latest
from resurgo.trainer.config import CheckpointConfig


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "a": torch.arange(64, dtype=torch.float32).reshape(16, 4),
        "b": torch.tensor([1.0, 2.0, 3.0]),
        "zeros": torch.zeros(8, 4),  # an all-zero chunk must still be written
    }


def _checkpointer(root: Path, state: TensorState, **overrides) -> Checkpointer:
    cfg = CheckpointConfig(**{"every": 1, "keep": 2, "resume": "latest", **overrides})
    return Checkpointer(cfg, root=root, states={"t": state}, max_chunk_bytes=64)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    _checkpointer(tmp_path, TensorState(_tensors())).save(1)
    return tmp_path / "step-00000001"


def _load(ckpt: Path, targets: dict[str, torch.Tensor] | None = None) -> TensorState:
    state = TensorState(
        targets if targets is not None else {n: torch.full_like(t, -7.0) for n, t in _tensors().items()}
    )
    original = state.state
    with pytest.raises(CheckpointError) as info:
        _checkpointer(ckpt.parent, state, resume=str(ckpt)).resume()
    # Nothing partially loaded: the state was not handed anything and its tensors are untouched.
    assert state.state is original
    assert all((t == -7).all() for t in original.values() if t.is_floating_point())
    return info.value


def _rewrite_metadata(ckpt: Path, edit) -> None:
    doc = json.loads((ckpt / "resurgo.json").read_text())
    edit(doc)
    raw = json.dumps(doc).encode()
    (ckpt / "resurgo.json").write_bytes(raw)
    (ckpt / "COMMITTED").write_text(json.dumps({"step": doc["step"], "metadata_crc32c": crc32c.crc32c(raw)}))


def test_round_trip_writes_every_chunk(ckpt):
    shard = ckpt / "t/zeros/c/0/0"
    index = np.frombuffer(shard.read_bytes()[-(2 * 16 + 4) : -4], dtype="<u8").reshape(2, 2)
    assert (index[:, 1] == 64 + 4).all()  # two all-zero chunks, each written with its checksum
    state = TensorState({n: torch.empty_like(t) for n, t in _tensors().items()})
    assert _checkpointer(ckpt.parent, state).resume() == 1
    assert all(torch.equal(state.state[n], t) for n, t in _tensors().items())


def test_keep_prunes_to_the_newest_and_latest_resolves_the_newest(tmp_path):
    saver = _checkpointer(tmp_path, TensorState(_tensors()))  # keep=2
    for step in (1, 2, 3, 4):
        saver.save(step)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]
    assert latest(tmp_path) == tmp_path / "step-00000004"


def test_truncated_shard(ckpt):
    shard = ckpt / "t/a/c/0/0"
    shard.write_bytes(shard.read_bytes()[:10])
    err = _load(ckpt)
    assert "'t/a' shard c/0/0 is 10 bytes" in str(err) and "truncated" in str(err) and "earlier checkpoint" in str(err)
    shard.write_bytes(b"")
    assert "'t/a' shard c/0/0 is 0 bytes" in str(_load(ckpt))


def test_flipped_byte_fails_the_checksum(ckpt):
    shard = ckpt / "t/a/c/0/0"
    data = bytearray(shard.read_bytes())
    data[64 + 4 + 5] ^= 0x10  # inside the second chunk
    shard.write_bytes(bytes(data))
    assert "'t/a' shard c/0/0 chunk (1, 0) fails its crc32c checksum" in str(_load(ckpt))


def test_deleted_array(ckpt):
    shutil.rmtree(ckpt / "t/b")
    assert "tensor 't/b': array 't/b' is missing" in str(_load(ckpt))


def test_deleted_shard_is_not_read_as_zeros(ckpt):
    (ckpt / "t/zeros/c/0/0").unlink()
    assert "'t/zeros' shard c/0/0 is missing" in str(_load(ckpt))


def test_chunk_marked_absent_in_its_shard_is_not_read_as_zeros(ckpt):
    shard = ckpt / "t/zeros/c/0/0"
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(2 * 16 + 4) : -4]), dtype="<u8").reshape(2, 2).copy()
    index[1] = 2**64 - 1  # how zarr marks a chunk it skipped
    data[-(2 * 16 + 4) :] = index.tobytes() + crc32c.crc32c(index.tobytes()).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    assert "'t/zeros' shard c/0/0 chunk (1, 0) is missing from its shard" in str(_load(ckpt))


def test_checkpoint_without_committed_marker(ckpt):
    (ckpt / "COMMITTED").unlink()
    assert latest(ckpt.parent) is None
    assert "no COMMITTED marker" in str(_load(ckpt))


def test_format_version_from_the_future(ckpt):
    _rewrite_metadata(ckpt, lambda d: d.update(format_version=99))
    assert "upgrade resurgo" in str(_load(ckpt))


def test_edited_metadata_fails_its_checksum(ckpt):
    (ckpt / "resurgo.json").write_text((ckpt / "resurgo.json").read_text().replace('"step": 1', '"step": 2'))
    assert "does not match the checksum" in str(_load(ckpt))


def test_metadata_path_outside_the_checkpoint(ckpt):
    _rewrite_metadata(ckpt, lambda d: d["tensors"]["t/a"].update(path="../../etc"))
    assert "tensor 't/a'" in str(err := _load(ckpt)) and "outside the checkpoint folder" in str(err)


def test_symlink_outside_the_checkpoint(ckpt, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    shutil.move(ckpt / "t/b", outside / "b")
    (ckpt / "t/b").symlink_to(outside / "b")
    assert "outside the checkpoint folder" in str(_load(ckpt))


def test_mismatched_tensors_are_listed_together(ckpt):
    targets = {"a": torch.full((4, 16), -7.0), "zeros": torch.full((8, 4), -7.0), "extra": torch.full((2,), -7.0)}
    message = str(_load(ckpt, targets))
    assert "t/a: saved (16, 4) float32, expected (4, 16) float32" in message
    assert "t/extra: missing from the checkpoint" in message
    assert "t/b: in the checkpoint (shape (3,)) but not in the state" in message


def test_non_strict_and_exclude_load_the_rest(ckpt):
    state = TensorState({"a": torch.zeros(16, 4), "b": torch.full((3,), -7.0), "extra": torch.zeros(2)})
    cfg = CheckpointConfig(resume="latest", exclude=["t/b"])
    Checkpointer(cfg, root=ckpt.parent, states={"t": state}, strict=False).resume()
    assert torch.equal(state.state["a"], _tensors()["a"])
    assert (state.state["b"] == -7).all() and torch.equal(state.state["extra"], torch.zeros(2))


def test_output_under_a_file_is_refused_clearly(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="not a directory|is a file"):
        _checkpointer(tmp_path / "file" / "ckpts", TensorState(_tensors())).save(1)


def test_read_only_output_directory(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    with _read_only(root):
        with pytest.raises(CheckpointError, match="not writable|read-only"):
            _checkpointer(root, TensorState(_tensors())).save(1)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _checkpointer(tmp_path, TensorState(_tensors())).save(1)
    calls = []

    def full(path, buffers, **kw):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(path, buffers, **kw)

    write = store.write_buffers
    monkeypatch.setattr(store, "write_buffers", full)
    with pytest.raises(CheckpointError) as info:
        _checkpointer(tmp_path, TensorState(_tensors())).save(2)
    assert "disk is full" in str(info.value) and "step-00000001" in str(info.value)
    monkeypatch.undo()
    _assert_only_step_one(tmp_path)


def test_real_full_tmpfs_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "small"
    root.mkdir()
    with _tmpfs(root, size="160k"):
        _checkpointer(root, TensorState(_tensors())).save(1)
        big = {**_tensors(), "big": torch.ones(512, 512)}  # 1 MiB does not fit
        with pytest.raises(CheckpointError, match="disk is full"):
            _checkpointer(root, TensorState(big)).save(2)
        _assert_only_step_one(root)


def _partial_save(root: Path, step: int, token: str, *, pid: int, host: str | None = None, nbytes: int = 16) -> Path:
    folder = root / f".step-{step:08d}.tmp-{token}"
    folder.mkdir(parents=True)
    (folder / "chunk").write_bytes(b"\0" * nbytes)
    (folder / commit.OWNER_FILE).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid}))
    return folder


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_save_sweeps_partial_saves_whose_writer_died_and_only_those(tmp_path):
    dead = _partial_save(tmp_path, 9, "dead", pid=_dead_pid())
    live = _partial_save(tmp_path, 9, "11fe", pid=os.getpid())
    remote = _partial_save(tmp_path, 9, "0a", pid=_dead_pid(), host="another-host")
    _checkpointer(tmp_path, TensorState(_tensors())).save(1)
    assert not dead.exists() and live.exists() and remote.exists()
    assert not (tmp_path / "step-00000001" / commit.OWNER_FILE).exists()  # a committed checkpoint holds no owner


def test_a_disk_filled_by_a_killed_save_frees_up_for_the_next(tmp_path):
    root = tmp_path / "small"
    root.mkdir()
    with _tmpfs(root, size="160k"):
        _partial_save(root, 9, "dead", pid=_dead_pid(), nbytes=150_000)
        _checkpointer(root, TensorState(_tensors())).save(1)
        _assert_only_step_one(root)


def _assert_only_step_one(root: Path) -> None:
    assert latest(root) == root / "step-00000001"
    assert [p.name for p in root.iterdir()] == ["step-00000001"]  # the failed save's folder is gone
    state = TensorState({n: torch.empty_like(t) for n, t in _tensors().items()})
    assert _checkpointer(root, state).resume() == 1


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


class _tmpfs:
    """Mount a small tmpfs over `path` for the block (skips the test where mounting is not allowed)."""

    def __init__(self, path: Path, *, size: str, options: str = "") -> None:
        self.path, self.opts = path, f"size={size}" + (f",{options}" if options else "")

    def __enter__(self) -> None:
        if (
            not _can_mount()
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", self.opts, f"resurgo-{uuid.uuid4().hex[:6]}", str(self.path)],
                capture_output=True,
            ).returncode
        ):
            pytest.skip("needs permission to mount a tmpfs")

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


def _read_only(path: Path):
    """A read-only directory: chmod for ordinary users; a read-only tmpfs for root, who ignores modes."""
    if os.geteuid() != 0:

        class _Chmod:
            def __enter__(self):
                path.chmod(0o500)

            def __exit__(self, *exc):
                path.chmod(0o700)

        return _Chmod()
    return _tmpfs(path, size="64k", options="ro")
