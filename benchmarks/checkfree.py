"""CheckFree and CheckFree+ against checkpoint-restart at small scale: steps and wall-clock to a target loss.

A small Llama in 4 pipeline stages of equal shape (`parallel.pp=4`, 2 layers each), 4 CPU ranks under
torchrun, trained `--steps` steps per run. Stage failures are drawn per stage per step, seeded, at the
paper's rates of 5, 10 and 16 % per stage per hour, with one simulated hour compressed into
`--hour-steps` steps here (so a rate r per hour is r / hour-steps per stage per step); every strategy
meets the same draws. Strategies:

- none: no failures (the reference curve, and the target: its smoothed loss at 80 % of the steps);
  none+: no failures either, on CheckFree+'s swapped routes (what training to stand in costs alone);
- CheckFree: the failed stage is dropped in the training process and rebuilt from its neighbours by
  the trainer's own rebuild (`fault.simulate.mode=drop`: the code path a real loss takes after the
  restart); a draw CheckFree refuses (an edge stage, adjacent stages) rolls back to the disk checkpoint;
- CheckFree+: the same with `parallel.pp_route=checkfree_plus` (edge stages copied from their swap
  partners; only adjacent pairs roll back);
- disk: a checkpoint every `--disk-every` steps; a failure rolls back to it and redoes the steps since;
- memory: resurgo's snapshot every step in the keeper; a failure loses no step.

What is measured and what is modelled: every loss curve and step time is a real run. The rebuilds
run in process (no process dies), so each failure is charged the restart its recovery takes for real,
measured here once per kind with a rank SIGKILLed mid-run under torchrun (`fault.simulate.mode=crash`
restoring from memory or from disk, `mode=kill` rebuilding from the neighbours), from the killed
step's record to the next one's, less one step. The disk and memory strategies restore exactly, so
their loss per step is the reference run's; their wall-clock is its step times plus, per failure, the
steps redone and the restart.

    python benchmarks/checkfree.py                       # about 12 minutes here
    python benchmarks/checkfree.py --steps 16 --rates 0.16 --hour-steps 4 --restart-at 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from resurgo.checkpoint.config import SimulateConfig
from resurgo.parallel.checkfree import CheckFreeRefused, plan_rebuild
from resurgo.parallel.pipeline import stage_layers
from resurgo.trainer.checkfree import FailureSimulator

STAGES, LAYERS = 4, 8
MODEL = [
    "experiment=smoke",
    "train.precision=fp32",
    f"parallel.pp={STAGES}",
    f"model.n_layers={LAYERS}",
    "train.log_every=1",
]
PARTNERS = {0: 1, 1: 0, 2: 3, 3: 2}  # CheckFree+'s swap partners on 4 stages (trainer.swap_partners)
WINDOW = 10  # steps of the moving average the target is met on


@dataclass
class Curve:
    """One strategy at one rate: the loss and wall-clock of every step, and the failure events."""

    name: str
    losses: list[float]
    seconds: list[float]  # cumulative wall-clock at the end of each step
    failures: list[int] = field(default_factory=list)  # steps after which a failure struck


def torchrun(root: Path, name: str, overrides: list[str], *, restarts: int = 0, raw: bool = False) -> list[dict]:
    """One training run; its records, the newest per step (a restart logs replayed steps again), or
    with `raw` every record in the order they were logged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={STAGES}"]
    cmd += [f"--max-restarts={restarts}", "-m", "resurgo.launch.train", *MODEL, *overrides]
    cmd += [f"run.root={root}", f"run.name={name}", "train.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"run {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in open(root / name / "metrics.jsonl")]
    if raw:
        return records
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def restart_seconds(root: Path, kind: str, *, steps: int, at: int, disk_every: int) -> float:
    """Kill (after step `at`) -> the first step done after the restart, less that step's own time: what
    one recovery of `kind` costs (steps a rollback redoes are charged apart)."""
    overrides = [f"train.steps={steps}", f"fault.simulate.at=[2@{at}]"]
    if kind == "disk":
        overrides += ["fault.simulate.mode=crash", "fault.keeper=off", f"checkpoint.every={disk_every}"]
    else:
        overrides += ["fault.simulate.mode=" + ("crash" if kind == "memory" else "kill"), "checkpoint.snapshot_every=1"]
    records = torchrun(root, f"restart-{kind}", overrides, restarts=1, raw=True)
    killed = next(i for i, r in enumerate(records) if r["step"] == at)
    after = records[killed + 1]
    return after["time"] - records[killed]["time"] - statistics.median(r["step_time_s"] for r in records[1:])


def draws(rate_per_step: float, *, steps: int, seed: int) -> dict[int, list[int]]:
    """The failures every strategy meets: step -> stages, as the trainer draws them."""
    simulator = FailureSimulator(SimulateConfig(stage_failure_rate=rate_per_step, seed=seed), n_stages=STAGES)
    return {s: lost for s in range(1, steps + 1) if (lost := simulator.draw(s))}


def refused(lost: list[int], *, plus: bool) -> bool:
    try:
        plan_rebuild(lost, stage_layers=stage_layers(LAYERS, STAGES), partners=PARTNERS if plus else None)
    except CheckFreeRefused:
        return True
    return False


def curve(name: str, records: list[dict], costs: dict[int, float], *, step_times: list[float] | None = None) -> Curve:
    """Wall-clock from the records' step times plus each failure's cost (after its step)."""
    times = step_times or [r["step_time_s"] for r in records]
    seconds, total = [], 0.0
    for record, t in zip(records, times):
        total += t + costs.get(record["step"], 0.0)
        seconds.append(total)
    return Curve(name, [r["loss"] for r in records], seconds, sorted(costs))


def rollback(step: int, *, every: int, step_s: float, restart_s: float) -> float:
    """A failure after `step` with a checkpoint every `every` steps: the restart and the steps redone."""
    return restart_s + (step % every) * step_s


def reached(c: Curve, target: float) -> tuple[int | None, float | None]:
    """The first step (and its wall-clock) whose moving-average loss is at or below the target."""
    for i in range(WINDOW - 1, len(c.losses)):
        if statistics.fmean(c.losses[i - WINDOW + 1 : i + 1]) <= target:
            return i + 1, c.seconds[i]
    return None, None


def plot(curves: dict[float, list[Curve]], target: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, (rate, cs) in zip(axes[0], curves.items()):
        for c in cs:
            smooth = [statistics.fmean(c.losses[max(0, i - WINDOW + 1) : i + 1]) for i in range(len(c.losses))]
            (line,) = ax.plot(c.seconds, smooth, label=c.name)
            marks = [c.seconds[s - 1] for s in c.failures if s <= len(c.seconds)]
            ax.plot(marks, [smooth[s - 1] for s in c.failures if s <= len(smooth)], "x", color=line.get_color())
        ax.axhline(target, color="grey", linestyle=":", label="target")
        ax.set(title=f"{rate:.0%} of stages fail per hour (x: a failure)", xlabel="wall-clock (s)", ylabel="loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def copies_bytes() -> tuple[int, int]:
    """Bytes the CheckFree+ copies add (the embedding on stage 1, the head on stage 2: parameters,
    gradients and two Adam moments, fp32) and the bytes of the same four for one body stage, counted
    on the model built on the meta device."""
    import torch
    from hydra import compose, initialize_config_module

    from resurgo.trainer.config import load_config
    from resurgo.trainer.model import Transformer

    with initialize_config_module(config_module="resurgo.recipes", version_base="1.3"):
        cfg = load_config(compose(config_name="train", overrides=MODEL))
    with torch.device("meta"):
        model = Transformer(cfg.model)
    count = {n: p.numel() for n, p in model.named_parameters()}
    copied = sum(n for name, n in count.items() if not name.startswith("layers."))
    body = sum(n for name, n in count.items() if name.startswith("layers.")) // STAGES
    return 4 * 4 * copied, 4 * 4 * body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rates", default="0.05,0.10,0.16", help="failures per stage per (simulated) hour")
    parser.add_argument("--hour-steps", type=int, default=60, help="steps one simulated hour is compressed into")
    parser.add_argument("--disk-every", type=int, default=30, help="the disk strategy's checkpoint interval")
    parser.add_argument("--restart-at", type=int, default=6, help="the step the restart measurements kill after")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="where runs go (default: a temporary folder)")
    parser.add_argument("--png", type=Path, default=Path("checkfree.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        run(args, root)


def run(args: argparse.Namespace, root: Path) -> None:
    steps = [f"train.steps={args.steps}", f"optim.schedule.decay_steps={args.steps}", "fault.keeper=off"]
    straight = torchrun(root, "none", steps)
    plus_straight = torchrun(root, "none-plus", [*steps, "parallel.pp_route=checkfree_plus"])
    restart_steps = args.restart_at + 4
    restart = {
        kind: restart_seconds(root, kind, steps=restart_steps, at=args.restart_at, disk_every=args.restart_at - 1)
        for kind in ("memory", "disk", "rebuild")
    }
    step_s = statistics.median(r["step_time_s"] for r in straight[1:])
    target = statistics.fmean(r["loss"] for r in straight[int(0.8 * args.steps) - WINDOW : int(0.8 * args.steps)])
    print(
        f"{STAGES} stages x {LAYERS // STAGES} layers, {args.steps} steps, 4 CPU ranks; one simulated hour = "
        f"{args.hour_steps} steps ({args.hour_steps * step_s:.1f} s here); median step {step_s * 1000:.0f} ms"
    )
    print(
        "restart measured (kill -> next step, less a step): " + ", ".join(f"{k} {v:.1f} s" for k, v in restart.items())
    )
    print(
        f"target: moving average ({WINDOW} steps) of the loss <= {target:.4f} (the no-failure run's at 80% of its steps)"
    )
    rows, curves = [], {}
    for rate in [float(r) for r in args.rates.split(",")]:
        per_step = rate / args.hour_steps
        events = draws(per_step, steps=args.steps, seed=args.seed)
        sim = [f"fault.simulate.stage_failure_rate={per_step}", f"fault.simulate.seed={args.seed}"]
        cf = torchrun(root, f"checkfree-{rate}", [*steps, *sim])
        cfp = torchrun(root, f"checkfree-plus-{rate}", [*steps, *sim, "parallel.pp_route=checkfree_plus"])

        def charged(plus: bool) -> dict[int, float]:
            return {
                s: rollback(s, every=args.disk_every, step_s=step_s, restart_s=restart["disk"])
                if refused(lost, plus=plus)
                else restart["rebuild"]
                for s, lost in events.items()
            }

        cs = [
            curve("none", straight, {}),
            curve("none+", plus_straight, {}),  # CheckFree+'s routes, no failure: what the swaps cost alone
            curve(
                "disk",
                straight,
                {s: rollback(s, every=args.disk_every, step_s=step_s, restart_s=restart["disk"]) for s in events},
            ),
            curve("memory", straight, dict.fromkeys(events, restart["memory"])),
            curve("CheckFree", cf, charged(False)),
            curve("CheckFree+", cfp, charged(True)),
        ]
        curves[rate] = cs
        for c in cs:
            step, seconds = reached(c, target)
            rows.append((rate, c.name, len(c.failures), step, seconds, statistics.fmean(c.losses[-WINDOW:])))
    print(
        f"\n{'failures/h':>10} {'strategy':<11} {'failures':>8} {'steps to target':>16} {'wall-clock to target':>21} {'final loss':>11}"
    )
    for rate, name, n, step, seconds, final in rows:
        at = f"{step}" if step else "not reached"
        wall = f"{seconds:.1f} s" if seconds else "-"
        print(f"{rate:>10.0%} {name:<11} {n:>8} {at:>16} {wall:>21} {final:>11.4f}")
    plain = statistics.median(r["step_time_s"] for r in straight[1:])
    swapped = statistics.median(r["step_time_s"] for r in plus_straight[1:])
    added, stage = copies_bytes()
    print(
        f"\nCheckFree+ step time {swapped * 1000:.0f} ms against {plain * 1000:.0f} ms with the same 1F1B plan "
        f"and no swaps: {swapped / plain:.3f}x (target <= 1.10)"
    )
    print(
        f"CheckFree+ copies (embedding on stage 1, head on stage {STAGES - 2}; parameters, gradients, 2 Adam "
        f"moments): {added / 2**20:.2f} MiB in all, against {stage / 2**20:.2f} MiB for one body stage"
    )
    plot(curves, target, args.png)
    print(f"plot: {args.png.resolve()}")


if __name__ == "__main__":
    main()
