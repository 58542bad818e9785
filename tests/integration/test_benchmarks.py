"""The README's benchmarks run at a tiny size, so that none breaks unseen."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def bench(name: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, str(REPO / "benchmarks" / name), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


def test_snapshot_stall_runs_every_method_and_reports_the_checksum_cost():
    out = bench(
        "snapshot_stall.py",
        "--ranks",
        "2",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--dim",
        "64",
        "--layers",
        "2",
    )
    rows = [line.split()[0] for line in out.splitlines()[2:8]]
    assert rows == ["none", "torch.save", "dcp.save", "dcp.async_save", "resurgo", "resurgo+persist"], out
    assert "then its checksums" in out


def test_throughput_compares_against_the_hand_written_loop():
    assert "ratio resurgo / baseline" in bench("throughput.py", "--steps", "2", "--skip-topologies")


def test_checkpoint_io_saves_and_loads_against_dcp_with_equal_threads(tmp_path):
    out = bench("checkpoint_io.py", "--gb", "0.01", "--ranks", "4", "--repeats", "1", "--dir", str(tmp_path))
    assert "dcp: 4 writer threads per rank" in out and "loaded tensors identical between resurgo and dcp: True" in out


def test_erasure_coding_runs_against_the_libraries():
    assert "resurgo / best library" in bench("erasure.py", "--mib", "4", "--repeat", "1")


def test_gpu_check_runs_every_part_at_a_tiny_size_on_cpu():
    out = bench("gpu.py", "--tiny", env={"TRITON_INTERPRET": "1"})
    table = out[out.index("part  ") :]
    for measure in (
        "encode k=4 m=2",
        "parity identical",
        "device to host",
        "registered shared segment",
        "tokens/s (2x32",
        "blocked per step",
        "a snapshot every step",
        "background copy",
    ):
        assert measure in table, out


def test_recovery_headlines_kill_to_first_step_from_memory_and_from_disk():
    out = bench(
        "recovery.py",
        "--skip-overhead",
        "--gb",
        "0.01",
        "--steps",
        "6",
        "--kill-at",
        "3",
        "--every",
        "2",
        "--recoveries",
        "1",
        timeout=900,
    )
    assert "kill -> first step after recovery" in out and "kill -> the step the node died after done again" in out, out
    assert "from peer keepers' memory" in out and "from disk" in out, out


@pytest.mark.slow  # about 9 minutes here, with the overhead runs: the test above runs the kills
def test_recovery_measures_a_node_loss_from_memory_and_from_disk():
    out = bench(
        "recovery.py",
        "--gb",
        "0.02",
        "--steps",
        "8",
        "--kill-at",
        "4",
        "--every",
        "2",
        "--repeats",
        "1",
        "--recoveries",
        "1",
        timeout=1200,
    )
    assert "from peer keepers' memory" in out and "from disk" in out


def test_checkfree_compares_every_strategy_and_measures_the_restarts(tmp_path):
    png = tmp_path / "checkfree.png"
    out = bench(
        "checkfree.py",
        *("--steps", "14", "--rates", "0.16", "--hour-steps", "4", "--restart-at", "2", "--png", str(png)),
        timeout=900,
    )
    assert "restart measured (kill -> next step, less a step): memory" in out and "rebuild" in out, out
    for strategy in ("none", "disk", "memory", "CheckFree", "CheckFree+"):
        assert f"16% {strategy} " in out, out
    assert "CheckFree+ step time" in out and "copies (embedding on stage 1" in out, out
    assert png.stat().st_size > 10_000


def test_rank_crash_compares_warm_restarts_with_torchruns():
    out = bench("rank_crash.py", "--kills", "1", "--every", "4", "--layouts", "2 ranks", timeout=600)
    assert "warm restart      median" in out and "torchrun restart  median" in out and "x faster" in out, out
    assert out.count("losses bit-exact: True") == 2, out


def test_goodput_soaks_through_every_kind_of_failure(tmp_path):
    png = tmp_path / "goodput.png"
    # a rank kill and a node loss (each restart costs ~12 s here); a stopped rank and a killed keeper
    # are the warm-restart and keeper-fault tests' own
    args = ["--nodes", "3", "--steps", "14", "--rank-kill-every", "5", "--node-kill-every", "10", "--png", str(png)]
    out = bench("goodput.py", *args, "--reference", timeout=900)
    soaked, reference = (
        float(m[1]) / 100 for m in re.finditer(r"goodput ([\d.]+)%: [\d.]+ s of useful steps over [\d.]+ s", out)
    )
    assert 0 < soaked < reference <= 1, out  # failures waste time that an uninterrupted run does not
    for kind in ("rank-kill", "node-kill"):
        assert f"{kind}: kill -> first step median" in out, out
    # a rank lost on one of several nodes: its supervisor forks it again, torchrun is not involved
    # ... and its timeline has every stage: detected, fenced, re-formed, restored, first step
    assert re.search(r"rank-kill +node\d's rank, pid \d+ \(warm restart\) +\d+( +\d+\.\d\d){5}", out), out
    assert re.search(r"node-kill +node\d \(torchrun restart", out), out
    exact = re.search(r"losses: bit-exact up to step (\d+) \(done before any node loss\): True", out)
    assert exact and int(exact[1]) >= 6, out  # the rank killed at step 5 came back bit-exactly
    assert png.stat().st_size > 10_000
