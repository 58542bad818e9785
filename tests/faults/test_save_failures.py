"""A checkpoint that cannot be written stops the run with the reason, and leaves nothing that looks valid.

The file system fails for real: a 256 KiB tmpfs as checkpoint.dir where this machine lets the tests
mount one, and everywhere a checkpoint.dir below a regular file, where every create fails (ENOTDIR)
as an unwritable disk fails it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_metrics
from resurgo.checkpoint.keeper.client import keeper_pid
from resurgo.checkpoint.store import commit as commits

TINY = ["model=tiny", "train.device=cpu", "train.seq_len=32", "train.batch_size=4", "model.n_layers=2"]


@pytest.fixture
def tmpfs(tmp_path):
    """A 256 KiB file system, or a skip where mounting is not allowed (the unwritable folder covers that)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def run(tmp_path: Path, overrides: list[str], *, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "resurgo.launch.train", *TINY, f"run.root={tmp_path}", "run.name=run", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    wait_keeper_gone(tmp_path / "run")
    return proc


def wait_keeper_gone(run_dir: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while keeper_pid(run_dir) is not None:
        assert time.monotonic() < deadline, "the keeper of a failed run is still running"
        time.sleep(0.1)


def assert_nothing_half_written(root: Path) -> None:
    assert commits.committed(root) == []
    assert sorted(p.name for p in root.glob(".*")) == [], "a temporary or coordination folder was left behind"


def test_a_full_tmpfs_stops_the_run_with_a_message_about_space(tmpfs, tmp_path):
    proc = run(tmp_path, ["train.steps=6", "checkpoint.every=3", f"checkpoint.dir={tmpfs}"])
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr and "the disk is full" in proc.stderr and str(tmpfs) in proc.stderr
    assert_nothing_half_written(tmpfs)


@pytest.mark.parametrize("keeper", ["auto", "off"])
def test_a_failing_write_stops_the_run_when_it_happens(tmp_path, keeper):
    """Persisting in the keeper (retried, then reported to the workers) or saving in the workers:
    either way the run stops long before its last step, says why and where, and says so in its metrics."""
    (tmp_path / "file").write_text("not a folder")
    root = tmp_path / "file" / "ckpt"
    proc = run(
        tmp_path,
        [
            "train.steps=1000",
            "train.log_every=1",
            "checkpoint.every=2",
            f"checkpoint.dir={root}",
            f"fault.keeper={keeper}",
        ],
    )
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Not a directory" in proc.stderr and str(root) in proc.stderr
    records = read_metrics(tmp_path / "run")
    assert records[-1]["step"] < 1000
    if keeper == "auto":
        assert any(r["persist_failed_step"] >= 2 for r in records), "the metrics never showed the failed persist"
        assert "attempt 3 of 3" in (tmp_path / "run" / "keeper.log").read_text()
