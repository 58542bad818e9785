"""How fast a job comes back after losing a node: from the survivors' memory against a disk checkpoint.

Simulated nodes on this machine (`LocalCluster`: a keeper and a torchrun agent each), one model of
`--gb` GB of training state (fp32 parameters and Adam moments), FSDP over every rank. In one run:

1. step time with erasure protection on (k+m parity across nodes) against off, snapshots every step
   in both: once with the nodes sharing every core, and once with the keepers bound to one core and
   the workers to the rest (a GPU node's keeper codes on host cores its training leaves free); each
   `--repeats` times, off and on in alternating order so that a drift of the machine's speed falls
   on both, with the ratio of every pair and their median; the CPU the keeper spends coding, and
   the host memory parity takes against one snapshot (expected about m/k);
2. a node SIGKILLed mid-training, the job resuming on the survivors from memory (`fault.erasure`);
3. the same kill with protection off and a disk checkpoint every `--every` steps, resuming from disk
   (the page cache dropped first where the machine allows);
2 and 3 `--recoveries` times, in alternating order, with the restore ratio of every pair and their
median (single restores of a few tenths of a second vary by half on a shared machine).

For 2 and 3 it prints, from the nodes' logs and metrics, the time from the kill to: the survivors'
workers failing (detection), the restarted workers starting to restore (re-rendezvous, start-up,
model build), the end of the restore (decode + reshard, or load), the first completed step, and the
step the node died after completed again (regained: the lost steps redone); and the steps of work
lost. The survivors' keepers decode the lost node's ranks while the workers restart
(checkpoint/keeper/rebuild.py); the restore then reads them as held copies, and the line `decode:` says
how long that took. Once a restarted worker knows its new rank, its keeper fetches what that rank's
restore would read from other nodes while the model is built (checkpoint/keeper/prefetch.py); the line
`prefetched:` says how much, and how long it took.

    python benchmarks/recovery.py --gb 1.0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from run_logs import GLOG_FAIL, RESUME, glog_time, py_time

from resurgo.launch.local_nodes import LocalCluster

# Steps before the overhead is measured: start-up, and the keepers' first coded steps, which touch
# their parity and receive buffers for the first time (reused from then on).
WARMUP = 6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--per-node", type=int, default=1, help="ranks per node")
    parser.add_argument("--gb", type=float, default=1.0, help="training state to protect, in GB")
    parser.add_argument(
        "--steps", type=int, default=14, help=f"steps per overhead run (the first {WARMUP} are warm-up)"
    )
    parser.add_argument("--kill-at", type=int, default=6, help="the step after which a node dies")
    parser.add_argument("--every", type=int, default=3, help="disk checkpoint interval of the disk run")
    parser.add_argument("--repeats", type=int, default=3, help="off/on pairs of overhead runs per core arrangement")
    parser.add_argument(
        "--recoveries", type=int, default=3, help="memory/disk pairs of kill runs, in alternating order"
    )
    parser.add_argument("--skip-overhead", action="store_true", help="only the kill runs (2 and 3)")
    parser.add_argument("--dir", default=None, help="where runs and checkpoints go (default: a temporary folder)")
    return parser.parse_args()


def model_overrides(gb: float) -> list[str]:
    """A Llama-style model whose parameters and Adam moments (12 bytes per parameter) make `gb` GB."""
    dim = 1024
    per_layer = 12 * dim * dim + 2 * dim  # attention 4 d^2, SwiGLU 3 * d * (8/3 d), norms
    layers = max(1, round(gb * 1e9 / 12 / per_layer))
    return [
        f"model.dim={dim}",
        f"model.n_layers={layers}",
        "model.n_heads=16",
        "model.n_kv_heads=16",
        "model.vocab_size=256",
    ]


def train_overrides(args: argparse.Namespace, steps: int) -> list[str]:
    ranks = args.nodes * args.per_node
    batch = math.lcm(ranks, ranks - args.per_node)  # one sequence per rank and pass, before and after the loss
    return [
        *model_overrides(args.gb),
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "train.seq_len=16",
        "train.log_every=1",
        "train.device=cpu",
        "train.precision=fp32",
        "optim.lr=1e-4",
    ]


def fresh(root: Path, name: str) -> str:
    """A run name whose folder is empty: old metrics would be taken for this run's progress."""
    shutil.rmtree(root / name, ignore_errors=True)
    return name


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_steps(cluster: LocalCluster, steps: int, *, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while len(metrics(cluster.run_dir)) < steps:
        if all(code is not None for code in cluster.poll()) or time.monotonic() > deadline:
            raise RuntimeError(f"the run stopped or stalled before step {steps}:\n{cluster.output(0)[-3000:]}")
        time.sleep(0.1)


@dataclass
class Overhead:
    step_s: float  # median step time
    snapshot_gib: float  # rank 0's node: host memory of the snapshots
    parity_gib: float  # and of the parity its keeper holds
    coding_cpu_s: float  # and CPU seconds its keeper spent on coding per step


def overhead_run(args: argparse.Namespace, root: Path, *, parity: int, split: bool = False) -> Overhead:
    """Step time with protection `parity` (0: off); `split`: keepers on the last CPU, workers on the others."""
    name = fresh(root, f"overhead-m{parity}{'-split' if split else ''}")
    overrides = [*train_overrides(args, args.steps), f"fault.erasure.parity={parity}"]
    cpus = sorted(os.sched_getaffinity(0))
    bound = dict(keeper_cpus=cpus[-1:], worker_cpus=cpus[:-1]) if split else {}
    with LocalCluster(
        nodes=args.nodes, nproc_per_node=args.per_node, overrides=overrides, run_root=root, name=name, **bound
    ) as cluster:
        codes = cluster.wait(timeout=1800)
        if any(codes):
            raise RuntimeError(f"overhead run failed {codes}:\n{cluster.output(0)[-3000:]}")
        records = metrics(cluster.run_dir)
    steps = [r["step_time_s"] for r in records[WARMUP:]]
    cpu = [r.get("protect_cpu_s", 0.0) for r in records]
    return Overhead(
        statistics.median(steps),
        records[-1]["host_mem_gib"],
        max(r.get("parity_mem_gib", 0.0) for r in records),
        (cpu[-1] - cpu[WARMUP - 1]) / max(1, len(cpu) - WARMUP),
    )


def compare(args: argparse.Namespace, root: Path, *, split: bool) -> tuple[str, Overhead]:
    """`--repeats` pairs of runs with protection off and on, in alternating order; a line with every
    pair's step times and ratio and the median ratio, and the last run with protection on."""
    pairs = []
    for repeat in range(args.repeats):
        order = (0, 1) if repeat % 2 == 0 else (1, 0)
        runs = {parity: overhead_run(args, root, parity=parity, split=split) for parity in order}
        pairs.append((runs[0], runs[1]))
    ratios = [on.step_s / off.step_s for off, on in pairs]
    each = ", ".join(f"off {off.step_s:.3f} s / on {on.step_s:.3f} s = {r:.3f}" for (off, on), r in zip(pairs, ratios))
    return f"{each}; median ratio {statistics.median(ratios):.3f}", pairs[-1][1]


_REBUILT = re.compile(r"rebuilt from peers' memory while the job restarted: ([^;]*)")
_PREFETCHED = re.compile(r"prefetched from peers while the workers started: ([^;]*)")


@dataclass
class Recovery:
    source: str
    detect_s: float
    restart_s: float
    restore_s: float
    first_step_s: float
    lost_steps: int
    regained_s: float  # from the kill until the step the node died after is done again
    detail: str

    @property
    def total_s(self) -> float:
        return self.detect_s + self.restart_s + self.restore_s + self.first_step_s


def kill_run(args: argparse.Namespace, root: Path, *, memory: bool) -> Recovery:
    name = fresh(root, "from-memory" if memory else "from-disk")
    protection = ["fault.erasure.parity=1"] if memory else ["fault.erasure.parity=0", f"checkpoint.every={args.every}"]
    overrides = [*train_overrides(args, args.kill_at + 4), *protection]
    with LocalCluster(
        nodes=args.nodes,
        nproc_per_node=args.per_node,
        min_nodes=args.nodes - 1,
        overrides=overrides,
        run_root=root,
        name=name,
    ) as cluster:
        wait_steps(cluster, args.kill_at)
        killed_at = len(metrics(cluster.run_dir))
        t_kill = time.time()
        cluster.kill_node(args.nodes - 1)
        if not memory:
            drop_page_cache()
        codes = cluster.wait(timeout=1800)
        log = cluster.output(0)
        failed = [i for i, code in enumerate(codes[:-1]) if code != 0]  # the last node is the one killed
        if failed:
            raise RuntimeError(f"{name}: node {failed[0]} failed:\n{cluster.output(failed[0])[-3000:]}")
    resumed = [m for m in RESUME.finditer(log) if not m["what"].startswith("fresh")][-1]
    t_resumed = py_time(resumed["t"])
    restore_s = float(resumed["s"])
    step = int(re.search(r"at step (\d+)", resumed["what"])[1])
    t_detect = min(glog_time(m) for m in GLOG_FAIL.finditer(log) if glog_time(m) > t_kill)
    after = metrics(cluster.run_dir)[killed_at:]
    first = next(r for r in after if r["step"] == step + 1)
    regained = next(r for r in after if r["step"] == killed_at)
    return Recovery(
        source=resumed["what"].split(" at step")[0],
        detect_s=t_detect - t_kill,
        restart_s=t_resumed - restore_s - t_detect,
        restore_s=restore_s,
        first_step_s=first["time"] - t_resumed,
        lost_steps=killed_at - step,
        regained_s=regained["time"] - t_kill,
        detail=resumed["what"],
    )


def drop_page_cache() -> None:
    global CACHE
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        CACHE = "cold page cache"
    except OSError:
        CACHE = "warm page cache (this machine does not allow dropping it)"


CACHE = "not measured"


def main() -> None:
    args = parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="resurgo-recovery-"))
    layers = model_overrides(args.gb)[1]
    print(f"{args.nodes} nodes x {args.per_node} ranks, {args.gb:.2f} GB of state ({layers}), in {root}", flush=True)

    if not args.skip_overhead:
        shared, on = compare(args, root, split=False)
        k = args.nodes - 1
        print(
            f"step time (median after {WARMUP} warm-up steps), the nodes sharing all {os.cpu_count()} cores: {shared}",
            flush=True,
        )
        if len(os.sched_getaffinity(0)) >= 2:
            # As on GPU nodes, whose keepers code on host cores that training leaves free: what remains
            # is what coding takes from training through memory bandwidth and caches.
            bound, _ = compare(args, root, split=True)
            print(
                f"step time, keepers bound to one core and workers to the others: {bound} (target <= 1.05)", flush=True
            )
        print(
            f"coding CPU of node 0's keeper: {on.coding_cpu_s:.3f} s per step = {on.coding_cpu_s / on.step_s:.1%} of one core "
            f"(the simulated nodes share this machine's cores; real nodes each code on their own)"
        )
        share = (
            on.parity_gib / (on.snapshot_gib / 3) if on.snapshot_gib else float("nan")
        )  # the keeper holds 3 slots per rank
        print(
            f"host memory of rank 0's node: snapshots {on.snapshot_gib:.3f} GiB (3 slots), parity {on.parity_gib:.3f} GiB = "
            f"{share:.2f} x one snapshot (m/k = 1/{k} = {1 / k:.2f} per coded step; up to 3 steps' worth: the newest "
            "protected, the one being coded, and spare buffers the next step reuses)"
        )

    pairs = []
    for repeat in range(args.recoveries):  # alternating order, as for the step times
        order = (True, False) if repeat % 2 == 0 else (False, True)
        runs = {memory: kill_run(args, root, memory=memory) for memory in order}
        pairs.append((runs[True], runs[False]))
    print(f"\nnode {args.nodes - 1} SIGKILLed after step {args.kill_at}; seconds from the kill ({CACHE} for disk):")
    print(
        f"{'pair':<6}{'source':<26}{'detect':>8}{'restart':>9}{'restore':>9}{'1st step':>10}{'total':>8}"
        f"{'lost steps':>12}{'regained':>10}"
    )
    for i, pair in enumerate(pairs, 1):
        for r in pair:
            print(
                f"{i:<6}{r.source:<26}{r.detect_s:>8.2f}{r.restart_s:>9.2f}{r.restore_s:>9.3f}{r.first_step_s:>10.2f}"
                f"{r.total_s:>8.2f}{r.lost_steps:>12d}{r.regained_s:>10.2f}"
            )
    totals = [statistics.median(r.total_s for r in side) for side in zip(*pairs)]
    regained = [statistics.median(r.regained_s for r in side) for side in zip(*pairs)]
    print(
        f"kill -> first step after recovery (median): memory {totals[0]:.2f} s, disk {totals[1]:.2f} s, "
        f"{totals[1] / totals[0]:.2f}x faster from memory"
    )
    print(
        f"kill -> the step the node died after done again (median): memory {regained[0]:.2f} s, disk {regained[1]:.2f} s, "
        f"{regained[1] / regained[0]:.2f}x faster from memory"
    )
    ratios = [disk.restore_s / memory.restore_s for memory, disk in pairs]
    each = ", ".join(f"{d.restore_s:.3f}/{m.restore_s:.3f} = {r:.1f}x" for (m, d), r in zip(pairs, ratios))
    print(
        f"the restore alone (after the survivors' keepers decoded and prefetched; see below), disk over memory: {each}; "
        f"median {statistics.median(ratios):.1f}x"
    )
    memory, disk = pairs[-1]
    ahead = _REBUILT.search(memory.detail)
    print(
        f"decode: {ahead[1] + ', while the workers restarted (inside the restart column, off the critical path)' if ahead else 'inside the restore'}"
    )
    prefetched = _PREFETCHED.search(memory.detail)
    print(
        f"prefetched: {prefetched[1] + ', while the model was built (inside the restart column)' if prefetched else 'nothing'}"
    )
    print(
        f"work lost: memory {memory.lost_steps} step(s) (snapshot_every=1), disk {disk.lost_steps} (checkpoint.every={args.every})"
    )
    print(f"memory: {memory.detail}\ndisk: {disk.detail}")


if __name__ == "__main__":
    main()
