"""The README's `./resurgo` commands: a clear usage on a wrong call, and the project's environment
found and used (a fresh clone's first call also creates and fills it: too slow for the suite, and
what CI's own run of `./resurgo test` does on every change)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _resurgo(*args: str) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "VIRTUAL_ENV": sys.prefix, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    return subprocess.run([str(REPO / "resurgo"), *args], capture_output=True, text=True, timeout=600, env=env)


def test_a_wrong_call_prints_the_usage():
    for args in ((), ("deploy",), ("run",)):
        proc = _resurgo(*args)
        assert proc.returncode == 2 and "./resurgo train" in proc.stderr and "./resurgo test" in proc.stderr, proc


def test_commands_run_in_the_active_environment():
    proc = _resurgo("run", "python", "-c", "import resurgo.trainer, sys; print(sys.prefix)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == sys.prefix
