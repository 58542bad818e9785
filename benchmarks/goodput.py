"""Goodput under failures: a soak on simulated nodes with failures injected on a schedule.

Simulated nodes on this machine (`LocalCluster`: a keeper, a warm template and a torchrun agent each,
an etcd member on the first three with `--rdzv etcd`), the tiny model (or `--dim`/`--layers` for longer
steps), snapshots to memory every step with parity across nodes. Failures, each every N steps (0:
never): a rank's training process SIGKILLed (`--rank-kill-every`), SIGSTOPped (`--rank-stop-every`;
its keeper ends it after `--hang-timeout` s), a node's keeper SIGKILLed (`--keeper-kill-every`), a
whole node SIGKILLed (`--node-kill-every`) or SIGSTOPped (`--node-stop-every`; its peers' keepers
leave it behind after `--peer-timeout` s), with a replacement node started after each. Victims
rotate; node 0, whose agent holds the c10d rendezvous store, is among them only under etcd, and
etcd's members only while a majority of them would survive.
`--baseline` runs the same schedule again the way a job ran before etcd and the warm templates
(c10d, every rank started cold, the rendezvous settings of then) and prints the ratio of the
node-loss times.

Printed: goodput, the useful step time over the wall time from the start of the first step to the end
of the last: useful is each step's time as last done (the time of a step that was lost and redone,
and every restart, count as waste); beside it the same with each step counted at the median step
time, which also counts the steps slower than the median as waste (on simulated nodes that share
this machine's cores, the jitter alone costs a few percent there). Also each failure's timeline
(kill -> detected -> the old world's last worker fenced, its successor forked at once -> process
group re-formed -> restore done -> first step), and, with `--reference`, both
goodputs of an uninterrupted run and the losses against it (bit-exact for the steps done before the
first node loss, within --rtol for all).
`--png` draws loss against wall-clock time with each failure marked.

    python benchmarks/goodput.py --steps 1000 --rank-kill-every 100 --node-kill-every 500 --dim 512 --layers 8
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from run_logs import records, restarts_seen, resumes, stamped

from resurgo.checkpoint.keeper.protocol import run_id, segment_prefix
from resurgo.checkpoint.keeper.shm import list_segments
from resurgo.launch.local_nodes import RDZV_CONF, LocalCluster
from resurgo.launch.process_tree import rank_process

# The rendezvous settings of the path before etcd and the warm templates, for --baseline.
BEFORE_CONF = {**RDZV_CONF, "last_call_timeout": 5, "keep_alive_interval": 2, "keep_alive_max_attempt": 3}
KINDS = ("rank-kill", "rank-stop", "keeper-kill", "node-kill", "node-stop")
NODE_LOSSES = ("node-kill", "node-stop")
DEADLINE_S = 900.0


@dataclass
class Failure:
    kind: str
    victim: str
    at_step: int
    killed: float
    detected: float | None = None
    fenced: float | None = None
    formed: float | None = None
    restored: float | None = None
    first_step: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def node(self) -> int:
        """The victim node's index (a node loss's)."""
        return int(self.victim.removeprefix("node"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--per-node", type=int, default=1, help="ranks per node")
    parser.add_argument("--steps", type=int, default=200)
    for kind in KINDS:
        parser.add_argument(f"--{kind}-every", type=int, default=0, help=f"steps between {kind} failures (0: none)")
    parser.add_argument("--hang-timeout", type=float, default=3.0, help="fault.hang_timeout_s")
    parser.add_argument("--peer-timeout", type=float, default=2.0, help="fault.peer_timeout_s")
    parser.add_argument(
        "--rdzv",
        choices=("c10d", "etcd"),
        default="etcd" if shutil.which("etcd") else "c10d",
        help="the rendezvous backend (default: etcd where its server is installed)",
    )
    parser.add_argument("--cold", action="store_true", help="no warm templates: torchrun starts every rank cold")
    parser.add_argument("--baseline", action="store_true", help="also run the schedule with c10d and cold ranks")
    parser.add_argument(
        "--no-replace", action="store_true", help="no replacement nodes: the job shrinks by one node per loss"
    )
    parser.add_argument(
        "--rdzv-conf",
        default="",
        help="torchrun --rdzv-conf of the soak (the baseline's are those used before, BEFORE_CONF): a round waits "
        "last_call_timeout for late nodes (default 0.5 s under etcd, 1 s under c10d, which takes whole seconds); "
        "under etcd a lost node is dead once its key in etcd stood still for 0.5 s",
    )
    parser.add_argument("--dim", type=int, default=64, help="model.dim (the tiny model's by default)")
    parser.add_argument("--layers", type=int, default=4, help="model.n_layers")
    parser.add_argument("--reference", action="store_true", help="also run without failures and compare losses")
    parser.add_argument("--rtol", type=float, default=1e-4, help="loss tolerance once the world changed size")
    parser.add_argument("--png", default=None, help="draw loss against wall-clock time here")
    parser.add_argument("--dir", default=None, help="where runs go (default: a temporary folder)")
    return parser.parse_args()


def overrides(args: argparse.Namespace) -> list[str]:
    return [
        "experiment=smoke",
        f"train.steps={args.steps}",
        # divisible by every data-parallel degree the job passes through
        f"train.batch_size={math.lcm(12, *range(1, args.nodes + 1)) * args.per_node}",
        "train.precision=fp32",
        "train.log_every=1",
        "train.device=cpu",
        f"model.dim={args.dim}",
        f"model.n_layers={args.layers}",
        f"fault.hang_timeout_s={args.hang_timeout:g}",
        f"fault.peer_timeout_s={args.peer_timeout:g}",
    ]


def schedule(args: argparse.Namespace) -> dict[int, str]:
    """Step -> the failure injected once that step is logged (a node loss wins a tie, then the rest in order)."""
    out: dict[int, str] = {}
    for kind in reversed(KINDS):
        every = getattr(args, f"{kind.replace('-', '_')}_every")
        for step in range(every, args.steps - 2, every) if every else ():
            out.setdefault(step, kind)
    return out


def inject(cluster: LocalCluster, kind: str, count: int, lost: set[int]) -> tuple[str, float] | None:
    """Cause one failure of `kind` (the `count`-th of its kind picks the victim); returns the victim's
    name and when it was hit, None when no node may be lost now or no rank trains (a replacement
    still joining does not). A node lost is added to `lost` (a stopped one's processes still exist)."""
    running = [i for i in cluster.alive() if i not in lost]
    if kind in NODE_LOSSES:
        # Nodes that train (a replacement still starting is not in the job yet); under etcd, members
        # too while Raft keeps a majority of them after the loss.
        spare = (len(cluster.etcd_nodes) - 1) // 2 - len(lost & cluster.etcd_nodes)
        candidates = [
            i
            for i in running
            if (i != 0 or cluster.rdzv == "etcd")
            and (i not in cluster.etcd_nodes or spare > 0)
            and training_process(cluster, i) is not None
        ]
        if not candidates:
            return None
        index = candidates[count % len(candidates)]
        lost.add(index)
        hit = time.time()  # before the node's processes are looked up, stopped and killed
        (cluster.kill_node if kind == "node-kill" else cluster.freeze_node)(index)
        return f"node{index}", hit
    if kind == "keeper-kill":
        node = cluster.node(running[count % len(running)])
        hit = time.time()
        os.kill(node.keeper.pid, signal.SIGKILL)
        return f"{node.node_id}'s keeper", hit
    ranks = {i: pid for i in running if (pid := training_process(cluster, i)) is not None}
    if not ranks:
        return None
    index = sorted(ranks)[count % len(ranks)]
    hit = time.time()  # not before the search of /proc for the victim, which takes tens of ms
    os.kill(ranks[index], signal.SIGKILL if kind == "rank-kill" else signal.SIGSTOP)
    return f"node{index}'s rank, pid {ranks[index]}", hit


def training_process(cluster: LocalCluster, index: int) -> int | None:
    """Node `index`'s local rank 0 training process, None while it has none."""
    return rank_process(f"RESURGO_KEEPER_DIR={cluster.node(index).keeper_dir}", local_rank=0)


def soak(
    args: argparse.Namespace, root: Path, name: str, *, failures: bool, rdzv: str, warm: bool, conf: dict
) -> tuple[list[Failure], list[dict], str]:
    plan = schedule(args) if failures else {}
    counts = dict.fromkeys(KINDS, 0)
    injected: list[Failure] = []
    lost: set[int] = set()  # the nodes killed or stopped
    losses = sum(kind in NODE_LOSSES for kind in plan.values())
    with LocalCluster(
        nodes=args.nodes,
        nproc_per_node=args.per_node,
        min_nodes=max(1, args.nodes - (losses if args.no_replace else 1)),
        max_nodes=args.nodes + len([k for k in plan.values() if k in NODE_LOSSES]),
        max_restarts=100,
        overrides=overrides(args),
        run_root=root,
        name=name,
        rdzv=rdzv,
        warm_template=warm,
        rdzv_conf=conf,
    ) as cluster:
        deadline = time.monotonic() + DEADLINE_S + args.steps * 5
        pending = sorted(plan)
        frozen: list[Failure] = []  # stopped nodes, until the others train again
        deferred: set[int] = set()  # scheduled steps whose failure waits for a node it may hit
        # Replacements start one after another beside the soak: a node's start takes seconds, in
        # which the schedule goes on.
        replacing, started = ThreadPoolExecutor(max_workers=1), []

        def replace(failure: Failure) -> None:
            if not args.no_replace:
                started.append(replacing.submit(lambda: failure.notes.append(f"replaced by node{cluster.add_node()}")))

        while any(code is None for i, code in enumerate(cluster.poll()) if i not in lost):
            assert time.monotonic() < deadline, "the soak ran past its deadline"
            logged = max((r["step"] for r in records(cluster.run_dir)), default=0)
            # A stopped node holds every collective, so two steps past it mean the others left it behind.
            for failure in [f for f in frozen if logged >= f.at_step + 2]:
                frozen.remove(failure)
                cluster.kill_node(failure.node)  # a hung machine is powered off before its replacement starts
                replace(failure)
            if pending and logged >= pending[0]:
                step = pending[0]
                kind = plan[step]
                hit = inject(cluster, kind, counts[kind], lost)
                if hit is None:  # it waits for the first node it may hit: every scheduled failure happens
                    if step not in deferred:
                        deferred.add(step)
                        print(f"  step {logged}: {kind} deferred: every node it may hit is still joining", flush=True)
                    time.sleep(0.1)  # looking for a victim reads /proc
                    continue
                pending.pop(0)
                victim, killed = hit
                counts[kind] += 1
                injected.append(Failure(kind, victim, logged, killed))
                if kind == "node-stop":
                    frozen.append(injected[-1])
                elif kind == "node-kill":
                    replace(injected[-1])
                print(f"  step {logged}: {kind} of {victim}", flush=True)
            time.sleep(0.02)
        replacing.shutdown(wait=True)
        for replacement in started:
            replacement.result()  # a replacement that failed to start says why
        for index in lost:
            cluster.kill_node(index)  # the stopped ones: they would never exit
        codes = cluster.wait(timeout=120)
        output = "\n".join(cluster.output(i) for i in range(len(cluster.alive(every=True))))
        # A replacement that came up after the last step finds the rendezvous closed: not a failure.
        late = {i for i in range(args.nodes, len(codes)) if "RendezvousClosedError" in cluster.output(i)}
        if any(code != 0 for i, code in enumerate(codes) if i not in lost | late):
            raise RuntimeError(f"the soak failed ({codes}):\n{output[-4000:]}")
        log = (cluster.run_dir / "train.log").read_text() if (cluster.run_dir / "train.log").exists() else ""
    if leaked := leftovers(cluster):
        raise RuntimeError(f"the soak left behind {leaked}")
    return injected, records(cluster.run_dir), output + "\n" + log


def leftovers(cluster: LocalCluster) -> list[str]:
    """What a stopped cluster left behind: its nodes' processes and its run's shared-memory segments."""
    nodes = cluster.alive(every=True)
    pids = sorted(set().union(*(cluster.node_pids(i) for i in nodes)))
    prefixes = tuple(segment_prefix(run_id(cluster.run_dir, node=f"node{i}")) for i in nodes)
    return [f"process {pid}" for pid in pids] + [
        f"segment {name}" for name, _ in list_segments() if name.startswith(prefixes)
    ]


def timeline(failures: list[Failure], metrics: list[dict], text: str) -> None:
    # a supervisor's warm restart, a keeper ending hung ranks, or torchrun restarting the workers
    restarted_by_torchrun = restarts_seen(text)
    seen = r"warm restart \d+|ending this node's ranks"
    detected = sorted(stamped(text, seen) + restarted_by_torchrun)
    # a supervisor that fenced its worker (and forks the next at once), or gave it up to torchrun
    fenced = stamped(text, seen + r"|the job's store is gone") + restarted_by_torchrun
    formed = stamped(text, r"process group of \d+ ranks formed")
    restored = resumes(text)
    for f in failures:
        f.detected = next((t for t in detected if t >= f.killed), None)
        f.restored = next((t for t in restored if t >= f.killed), None)
        f.fenced = max((t for t in fenced if f.killed <= t <= (f.restored or math.inf)), default=None)
        f.formed = next((t for t in formed if t >= (f.fenced or f.killed)), None)
        f.first_step = min((r["time"] for r in metrics if f.restored and r["time"] > f.restored), default=None)
        if f.restored:  # how the job came back: torchrun restarted a worker in between, or nobody did
            torchrun = any(f.killed <= t <= f.restored for t in restarted_by_torchrun)
            f.notes.insert(0, "torchrun restart" if torchrun else "warm restart")


@dataclass
class Goodput:
    useful: float  # seconds: each step's time as last done
    steps: int
    median: float  # seconds per step
    wall: float  # seconds from the start of the first step to the end of the last

    @property
    def value(self) -> float:
        return self.useful / self.wall

    @property
    def by_median(self) -> float:
        """With every step counted at the median: steps slower than it are waste too."""
        return self.steps * self.median / self.wall

    def __str__(self) -> str:
        return (
            f"goodput {self.value:.1%}: {self.useful:.1f} s of useful steps over {self.wall:.1f} s; "
            f"{self.by_median:.1%} counting each step at the median ({self.steps} steps x {self.median:.3f} s)"
        )


def goodput(metrics: list[dict]) -> Goodput:
    """From the run's step records (a redone step's newest record is the one that counts)."""
    kept = {r["step"]: r for r in sorted(metrics, key=lambda r: r["time"])}
    # by the steps' own ends (a record is stamped later, after the loss's all-reduce and the metrics)
    first = min(metrics, key=lambda r: r["ended"])
    wall = max(r["ended"] for r in metrics) - (first["ended"] - first["step_time_s"])
    median = statistics.median(r["step_time_s"] for r in metrics)
    return Goodput(sum(r["step_time_s"] for r in kept.values()), len(kept), median, wall)


def draw(png: Path, metrics: list[dict], failures: list[Failure]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = min(r["time"] for r in metrics)
    fig, ax = plt.subplots(figsize=(10, 4))
    # points, not a line: a line would draw training across the gaps the failures left
    ax.plot([r["time"] - start for r in metrics], [r["loss"] for r in metrics], ".", ms=3, color="black")
    colors = dict(zip(KINDS, ("tab:red", "tab:orange", "tab:purple", "tab:blue", "tab:green"), strict=True))
    for kind in KINDS:
        times = [f.killed - start for f in failures if f.kind == kind]
        for i, t in enumerate(times):
            ax.axvline(t, color=colors[kind], lw=0.8, ls="--", label=kind if i == 0 else None)
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def report(
    args: argparse.Namespace, root: Path, name: str, *, rdzv: str, warm: bool, conf: dict
) -> tuple[list, list, dict]:
    """One soak with failures, printed: goodput, each failure's timeline, the median per kind."""
    how = f"{rdzv} rendezvous {','.join(f'{k}={v}' for k, v in conf.items())}, ranks " + (
        "forked from warm templates" if warm else "started cold"
    )
    print(f"soak: {args.nodes} nodes x {args.per_node}, {args.steps} steps, {how}, runs in {root / name}", flush=True)
    failures, metrics, text = soak(args, root, name, failures=True, rdzv=rdzv, warm=warm, conf=conf)
    timeline(failures, metrics, text)
    print(goodput(metrics))
    print(
        f"  {'failure':15} {'victim (how it came back)':58} at step  detect   fenced   formed  restore  first step (s after)"
    )
    for f in failures:
        times = (f.detected, f.fenced, f.formed, f.restored, f.first_step)
        cells = [f"{t - f.killed:7.2f}" if t else "      -" for t in times]
        victim = f"{f.victim} ({', '.join(f.notes)})" if f.notes else f.victim
        print(f"  {f.kind:15} {victim:58} {f.at_step:7}  {'  '.join(cells)}")
    by_kind: dict[str, float] = {}
    for kind in KINDS:
        times = [f.first_step - f.killed for f in failures if f.kind == kind and f.first_step]
        if times:
            by_kind[kind] = statistics.median(times)
            print(f"  {kind}: kill -> first step median {by_kind[kind]:.2f} s over {len(times)}")
    return failures, metrics, by_kind


def main() -> None:
    args = parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="resurgo-goodput-"))
    last_call = 0.5 if args.rdzv == "etcd" else 1
    conf = {
        **RDZV_CONF,
        "last_call_timeout": last_call,
        **dict(i.split("=", 1) for i in args.rdzv_conf.split(",") if i),
    }
    failures, metrics, medians = report(args, root, "soak", rdzv=args.rdzv, warm=not args.cold, conf=conf)
    if args.baseline:
        _, _, before = report(args, root, "baseline", rdzv="c10d", warm=False, conf=BEFORE_CONF)
        for kind in set(medians) & set(before):
            print(
                f"  {kind}: {before[kind]:.2f} s before (c10d, cold) / {medians[kind]:.2f} s now = {before[kind] / medians[kind]:.1f}x"
            )
    if args.reference:
        _, straight, _ = soak(args, root, "reference", failures=False, rdzv=args.rdzv, warm=not args.cold, conf=conf)
        print(f"reference, no failures: {goodput(straight)}")
        want = {r["step"]: r["loss"] for r in straight}
        newest = {r["step"]: r for r in metrics}  # a redone step: its newest record
        # Exact on the topology it started with: the steps last done before the first node loss (the
        # step being protected when a node died is redone on fewer nodes).
        first_loss = min((f.killed for f in failures if f.kind in NODE_LOSSES), default=math.inf)
        same_world = [s for s in sorted(newest) if newest[s]["time"] < first_loss]
        exact = all(newest[s]["loss"] == want[s] for s in same_world)
        worst = max(abs(newest[s]["loss"] - want[s]) / abs(want[s]) for s in want)
        print(
            f"losses: bit-exact up to step {max(same_world, default=0)} (done before any node loss): {exact}; "
            f"largest relative gap {worst:.2e}, within --rtol {args.rtol:g}: {worst <= args.rtol}"
        )
    if args.png:
        draw(Path(args.png), metrics, failures)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
