"""Shared test helpers: run the real launch path and read what it logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def launch(
    overrides: list[str],
    *,
    nproc: int,
    root: Path,
    name: str = "run",
    timeout: float = 600,
    extra_torchrun: list[str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """`torchrun -m resurgo.launch.train` (or plain python for one process), as a user would."""
    args = [f"run.root={root}", f"run.name={name}", "train.device=cpu", *overrides]
    if nproc == 1 and not extra_torchrun:
        cmd = [sys.executable, "-m", "resurgo.launch.train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *(extra_torchrun or []),
            "-m",
            "resurgo.launch.train",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def import_transformers():
    """transformers, imported without the repository root on sys.path: `python -m pytest` puts it there,
    and its `kernels/` folder would shadow the `kernels` package transformers probes for."""
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401  (loads the modeling code now)
    finally:
        sys.path[:] = saved
    return transformers


def rank_killed(log: str, rank: int) -> bool:
    """Whether a launch's output tells that `rank`'s process died by SIGKILL: torchrun says it when it
    restarts cold, a warm restart's supervisor when it forks a new worker."""
    warm = f"[resurgo.warm] rank {rank}: warm restart" in log and "ended by SIGKILL" in log
    return warm or f"failed (exitcode: -9) local_rank: {rank}" in log


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
