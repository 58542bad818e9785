"""Process-group start-up helpers that need no second process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from resurgo.trainer.distributed import stop_restarts


def test_stop_restarts_signals_only_a_torchrun_parent(monkeypatch):
    """Outside torchrun (here: pytest is the parent, even with torchrun's variables set) nothing is signalled."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert stop_restarts() is False
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r")
    assert stop_restarts() is False
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN


def test_stop_restarts_terminates_a_torchrun_parent(tmp_path):
    """A child of a process started as `torch.distributed.run` sends it SIGTERM."""
    child = "from resurgo.trainer.distributed import stop_restarts; print(stop_restarts())"
    # The parent's command line names torch.distributed.run (argv[1]); it waits for SIGTERM from its child.
    parent = (
        "import signal, subprocess, sys; got = []; signal.signal(signal.SIGTERM, lambda *a: got.append(1)); "
        f"out = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, env=dict(__import__('os').environ, TORCHELASTIC_RUN_ID='r')); "
        "print(out.stdout.strip(), bool(got))"
    )
    done = subprocess.run(
        [sys.executable, "-c", parent, "torch.distributed.run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert done.stdout.split() == ["True", "True"], done.stderr
