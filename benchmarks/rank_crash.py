"""How fast a job comes back after one rank's process dies: warm restarts against torchrun's own restart.

One run per layout and per way of restarting, the tiny model, snapshots to the keeper every step: a
rank's training process SIGKILLed every `--every` steps (ranks in turn), `--kills` times. Warm (the
default): the rank's supervisor forks a new worker, the others are fenced and forked again, all
restore from memory. Cold (RESURGO_WARM_RESTARTS=0): torchrun restarts every worker, each paying for
the interpreter, the imports and the rendezvous, then restores from memory too. For each kill, the
time from the kill to the step being trained at the kill done again; the median of each, their ratio,
and whether the losses equal an uninterrupted run's bit for bit.

    python benchmarks/rank_crash.py --kills 10
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import run_logs
from run_logs import records

from resurgo.launch.process_tree import rank_process

LAYOUTS = {
    "2 ranks": (2, []),
    "4 ranks pp=2 x tp=2": (4, ["parallel.pp=2", "parallel.tp=2"]),
}
BASE = ["experiment=smoke", "train.precision=fp32", "train.log_every=1", "train.device=cpu"]
DEADLINE_S = 600.0


@dataclass
class Run:
    recoveries: list[float]  # seconds from each kill to the killed step done again
    losses: list[float]  # by step, the newest record of a redone step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="kills per run")
    parser.add_argument("--every", type=int, default=6, help="steps between kills")
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument(
        "--stop",
        type=float,
        default=0.0,
        metavar="S",
        help="SIGSTOP the rank instead (a hung rank), with fault.hang_timeout_s=S: its keeper ends it after S s",
    )
    parser.add_argument("--dir", default=None, help="where runs go (default: a temporary folder)")
    return parser.parse_args()


def launch(root: Path, name: str, nproc: int, overrides: list[str], *, warm: bool, restarts: int) -> subprocess.Popen:
    marker = f"RESURGO_BENCH_RUN={root / name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [f"--max-restarts={restarts}", "-m", "resurgo.launch.train", f"run.root={root}", f"run.name={name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESURGO_WARM_RESTARTS": "1" if warm else "0"}
    env[marker.split("=", 1)[0]] = marker.split("=", 1)[1]
    log = open(root / f"{name}.out", "w")
    return subprocess.Popen([*cmd, *BASE, *overrides], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)


def resumes(run_dir: Path) -> list[float]:
    log = run_dir / "train.log"
    return run_logs.resumes(log.read_text() if log.exists() else "")


def wait(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (code {proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def killing_run(
    root: Path, name: str, nproc: int, overrides: list[str], *, warm: bool, kills: int, every: int, sig: int
) -> Run:
    steps = every * (kills + 1)
    proc = launch(root, name, nproc, [*overrides, f"train.steps={steps}"], warm=warm, restarts=0 if warm else kills)
    run_dir, marker = root / name, f"RESURGO_BENCH_RUN={root / name}"
    recoveries = []
    for i in range(kills):
        at = every * (i + 1)
        wait(proc, lambda: any(r["step"] >= at for r in records(run_dir)), f"step {at}")
        before = len(resumes(run_dir))
        pid = rank_process(marker, f"RANK={i % nproc}", local_rank=i % nproc)
        killed = time.time()
        os.kill(pid, sig)
        # The first step the restarted job completes: the one the kill interrupted (or, when a step ended
        # between the kill and the others noticing, the one after it). A step logged by the old job
        # right after the kill is not a recovery.
        wait(proc, lambda: len(resumes(run_dir)) > before, "the restarted job's restore")
        resumed = resumes(run_dir)[before]
        wait(proc, lambda: any(r["time"] > resumed for r in records(run_dir)), "the first step after the restore")
        recoveries.append(min(r["time"] for r in records(run_dir) if r["time"] > resumed) - killed)
    if proc.wait(timeout=DEADLINE_S) != 0:
        raise RuntimeError(f"{name} failed: {(root / f'{name}.out').read_text()[-3000:]}")
    by_step = {r["step"]: r["loss"] for r in records(run_dir)}
    return Run(recoveries, [by_step[s] for s in sorted(by_step)])


def straight_run(root: Path, name: str, nproc: int, overrides: list[str], steps: int) -> list[float]:
    proc = launch(root, name, nproc, [*overrides, f"train.steps={steps}"], warm=True, restarts=0)
    if proc.wait(timeout=DEADLINE_S) != 0:
        raise RuntimeError(f"{name} failed: {(root / f'{name}.out').read_text()[-3000:]}")
    return [r["loss"] for r in records(root / name)]


def main() -> None:
    args = parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="resurgo-crash-"))
    root.mkdir(parents=True, exist_ok=True)
    how = f"SIGSTOPped (fault.hang_timeout_s={args.stop:g})" if args.stop else "SIGKILLed"
    print(f"a rank {how} {args.kills} times, every {args.every} steps (runs in {root})", flush=True)
    target = args.stop + 2 if args.stop else 2
    for layout in args.layouts:
        nproc, overrides = LAYOUTS[layout]
        if args.stop:
            overrides = [*overrides, f"fault.hang_timeout_s={args.stop:g}"]
        slug = layout.split()[0]
        straight = straight_run(root, f"straight-{slug}", nproc, overrides, args.every * (args.kills + 1))
        runs = {}
        for mode in ("warm", "cold"):
            runs[mode] = killing_run(
                root,
                f"{mode}-{slug}",
                nproc,
                overrides,
                warm=mode == "warm",
                kills=args.kills,
                every=args.every,
                sig=signal.SIGSTOP if args.stop else signal.SIGKILL,
            )
        warm, cold = (statistics.median(runs[m].recoveries) for m in ("warm", "cold"))
        print(f"{layout}:")
        for mode in ("warm", "cold"):
            times = " ".join(f"{t:.2f}" for t in runs[mode].recoveries)
            exact = runs[mode].losses == straight
            label = "warm restart" if mode == "warm" else "torchrun restart"
            print(
                f"  {label:17} median {statistics.median(runs[mode].recoveries):6.2f} s   [{times}]   "
                f"losses bit-exact: {exact}"
            )
        targets = f"warm median <= {target:g} s" + ("" if args.stop else ", >= 4x")
        print(f"  warm / torchrun: {cold / warm:.1f}x faster  (targets: {targets})", flush=True)


if __name__ == "__main__":
    main()
