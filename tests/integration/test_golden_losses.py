"""Behaviour kept to the bit across refactors: fixed-seed runs through the real launch path log the
per-step losses and gradient norms recorded in tests/golden/losses.json. Exact on the CPU kind that
recorded them; another kind may vectorise reductions differently, so there within 1e-6 relative.

Record again (only when a change means to alter the numbers): python tests/integration/test_golden_losses.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import REPO, launch, read_metrics  # noqa: E402

GOLDEN = REPO / "tests" / "golden" / "losses.json"
BASE = ["experiment=smoke", "train.steps=6", "train.precision=fp32", "train.seed=7"]
RUNS = {
    "pp=2 x tp=2": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=1F1B"]),
    "dp_shard=2, a memory snapshot every step": (
        2,
        ["parallel.dp_shard=2", "fault.keeper=auto", "checkpoint.snapshot_every=1"],
    ),
}


def cpu_kind() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return f"{model}; {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}"


def run(name: str, root: Path) -> list[list[float]]:
    nproc, overrides = RUNS[name]
    launch([*BASE, *overrides], nproc=nproc, root=root)
    return [[r["loss"], r["grad_norm"]] for r in read_metrics(root / "run")]


@pytest.mark.parametrize("name", list(RUNS))
def test_losses_match_the_recorded_ones(name, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got, want = run(name, tmp_path), golden["runs"][name]
    if golden["cpu"] == cpu_kind():
        assert got == want, f"{name}: the per-step (loss, grad norm) changed:\n got  {got}\n want {want}"
    else:
        flat = [value for pair in want for value in pair]  # pytest.approx takes flat sequences only
        assert [value for pair in got for value in pair] == pytest.approx(flat, rel=1e-6), name


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: run(name, Path(tmp) / str(i)) for i, name in enumerate(RUNS)}
    GOLDEN.write_text(json.dumps({"cpu": cpu_kind(), "runs": runs}, indent=1) + "\n")
    print(f"recorded {GOLDEN}")
