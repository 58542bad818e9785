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


def test_a_config_that_cannot_run_here_stops_torchrun_and_a_late_node_does_not(monkeypatch, capsys):
    """A config that fails on this world fails every restart the same way: stop. A node left out of
    the world while alive is mended by the next round: leave the restart to torchrun."""
    import pytest

    from resurgo.checkpoint import WorldIncomplete
    from resurgo.launch import training

    stopped = []
    monkeypatch.setattr(training, "stop_restarts", lambda: stopped.append(True) or True)
    for error, stops in (
        (training.WrongForThisWorld("train.batch_size=12 is not divisible by 5 ranks"), True),
        (WorldIncomplete("memory cannot rebuild the run without node2"), False),
    ):
        stopped.clear()

        def fail(job, error=error):
            raise error

        monkeypatch.setattr(training, "train", fail)
        with pytest.raises(SystemExit) as ended:
            training._train_or_explain(None)
        assert ended.value.code == 1 and stopped == ([True] if stops else [])
        assert str(error) in capsys.readouterr().err
