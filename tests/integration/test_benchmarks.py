"""The README's benchmarks run at a tiny size, so that none breaks unseen."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_snapshot_stall_runs_every_method_and_reports_the_checksum_cost():
    cmd = [sys.executable, str(REPO / "benchmarks" / "snapshot_stall.py"), "--ranks", "2", "--rounds", "1", "--steps", "1",
           "--warmup", "0", "--dim", "64", "--layers", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split()[0] for line in proc.stdout.splitlines()[2:8]]
    assert rows == ["none", "torch.save", "dcp.save", "dcp.async_save", "resurgo", "resurgo+persist"], proc.stdout
    assert "then its checksums" in proc.stdout
