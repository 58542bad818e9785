"""The offload benchmark runs at its tiny size and prints every row, so that it never breaks unseen."""

from __future__ import annotations

from test_benchmarks import bench


def test_offload_benchmark_prints_rates_and_step_times():
    out = bench("offload.py", "--tiny", "--steps", "1")
    assert "torch fused" in out and "torch foreach" in out and "DeepSpeedCPUAdam" in out, out
    assert "resurgo default" in out and "(target >= 0.9)" in out, out
    for mode in ("off", "cpu", "auto"):
        assert f"offload {mode}" in out, out
