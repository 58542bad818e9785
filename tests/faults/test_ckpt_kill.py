"""A save killed with SIGKILL at any point leaves the previous checkpoint loadable, the partial
one ignored, and a later save cleans it up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from resurgo.checkpoint.store.checkpointer import Checkpointer
from resurgo.checkpoint.store.commit import latest
from resurgo.trainer.config import CheckpointConfig

# Runs in a child process: save step 1, then stop at the chosen point of saving step 2 and wait to be killed.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from resurgo.checkpoint.store import commit
    from resurgo.checkpoint.store import writer as store
    from resurgo.checkpoint.store.checkpointer import Checkpointer
    from resurgo.trainer.config import CheckpointConfig

    root, point = Path(sys.argv[1]), sys.argv[2]

    class State:
        def __init__(self, scale):
            self.tensors = {"w": torch.arange(4096.0).reshape(64, 64) * scale, "b": torch.ones(64) * scale}
        def state_dict(self):
            return {**self.tensors, "step": int(self.tensors["b"][0])}
        def load_state_dict(self, sd):
            pass

    def stop_here(*args, **kwargs):
        (root / "stopped").write_text(point)
        time.sleep(600)

    def stop_when(pred, fn):
        def wrapped(*args, **kwargs):
            if pred(*args):
                stop_here()
            return fn(*args, **kwargs)
        return wrapped

    ck = Checkpointer(CheckpointConfig(keep=3), root=root, states={"s": State(1)}, max_chunk_bytes=4096, max_shard_bytes=4096)
    ck.save(1)
    ck.states["s"] = State(2)
    writes = []
    if point == "chunks":
        store.write_buffers = stop_when(lambda path, bufs, **kw: writes.append(path) or len(writes) == 3, store.write_buffers)
    elif point == "marker":
        commit.write_file = stop_when(lambda path, data: path.name == "COMMITTED", commit.write_file)
    elif point == "rename":
        commit.fsync_dir = stop_when(lambda path: (path / "COMMITTED").exists() and ".tmp-" in path.name, commit.fsync_dir)
    ck.save(2)
    """
)


class State:
    def __init__(self) -> None:
        self.loaded: dict = {}

    def state_dict(self) -> dict:
        return {"w": torch.zeros(64, 64), "b": torch.zeros(64), "step": 0}

    def load_state_dict(self, sd: dict) -> None:
        self.loaded = sd


@pytest.mark.parametrize("point", ["chunks", "marker", "rename"])
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path, point):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), point])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "stopped").exists():
            assert child.poll() is None, f"the saving process exited early with {child.returncode}"
            assert time.monotonic() < deadline, "the saving process never reached the kill point"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    (tmp_path / "stopped").unlink()

    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".step-00000002.tmp-")]
    assert len(partial) == 1, "the killed save should leave its partial folder behind"
    assert latest(tmp_path) == tmp_path / "step-00000001"

    state = State()
    ck = Checkpointer(CheckpointConfig(resume="latest", keep=3), root=tmp_path, states={"s": state})
    assert ck.resume() == 1
    assert torch.equal(state.loaded["w"], torch.arange(4096.0).reshape(64, 64)) and state.loaded["step"] == 1

    # Named as a later step, which no commit's pruning removes: its dead writer is what clears it,
    # before the next save writes (a killed save that filled the disk would fail every later one).
    partial[0].rename(tmp_path / partial[0].name.replace("00000002", "00000009"))
    ck.save(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000003"]
