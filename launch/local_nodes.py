"""`python -m resurgo.launch.local_nodes`: several nodes simulated on this machine, for demos and tests.

    python -m resurgo.launch.local_nodes --nodes 3 --nproc-per-node 2 --min-nodes 2 -- train.device=cpu

Each simulated node is what `launch/multinode.sh` starts on a real machine: a keeper, a warm template
the ranks are forked from (`launch/warm_template.py`; `warm_template=False` starts them cold) and a
torchrun agent, with its own RESURGO_NODE_ID (node<i>), its own private RESURGO_KEEPER_DIR and
RESURGO_PEER_HOST=127.0.0.1, so that keepers of one run never take each other's socket, lock or
memory. The keeper and the agent of a node each lead their own process group, so a test can kill a
whole node with SIGKILL (`LocalCluster.kill_node`) the way a machine dies: nothing runs a handler.

With the c10d rendezvous (the default) the store lives in node 0's agent: killing node 0 ends the
rendezvous for every node, as losing the rendezvous host does on a cluster. With `rdzv="etcd"`
(`--rdzv etcd`) the first three nodes each also run an etcd member (`resurgo.launch.etcd`), and any
one node may die, node 0 included; the replacement of a member's node runs that member again, so
that the next node may die too.

Linux only: processes are found through /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from resurgo.checkpoint import process_alive, reclaim_stale

from . import etcd
from .process_tree import all_pids, descendants, signal_all, wait_gone
from .warm_template import TEMPLATE_ENV

# Rendezvous settings (torchrun --rdzv-conf) that let the survivors of a lost node train again within
# seconds instead of the defaults' ~45 s:
# - keep_alive_interval=1, keep_alive_max_attempt=3 (c10d): a node without a heartbeat for 3 s is dead
#   and leaves the rendezvous (default 5 s x 3); the survivors' next round waits for that. Not lower:
#   on a loaded machine a heartbeat can be late, and a node dropped while alive never sends one again.
#   Under etcd a node is alive while it keeps rewriting its key in etcd (launch/etcd_rendezvous.py), whatever these say.
# - last_call_timeout=3: once the minimum number of nodes is in, wait 3 s more for the others
#   (default 30 s). Every node's template is up before any agent starts, so the agents start
#   together; a node later than that joins at the next re-rendezvous, which the agents start as
#   soon as it waits.
# - join_timeout=120: how long an agent waits for the minimum number of nodes before it gives up
#   (default 600 s): long enough for a replacement node to start, short enough that a test fails
#   quickly when one never comes.
# - close_timeout=10: how long closing the rendezvous at the end may take (default 30 s).
RDZV_CONF = {
    "join_timeout": 120,
    "last_call_timeout": 3,
    "close_timeout": 10,
    "keep_alive_interval": 1,
    "keep_alive_max_attempt": 3,
}
# torch 2.13's agents share one store with the workers, but the rank-0 agent publishes its address only
# in the first round it is rank 0: a node joining later (a replacement) waits for it until the
# rendezvous times out. Without the sharing, rank 0 publishes a fresh address every round.
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# Every node runs the same number of ranks, so each agent computes its ranks from its place in the
# round; otherwise rank 0's agent hands them out through the store, and an agent whose rank 0 was
# lost right then waited for them for 300 s, then died (a node lost during a restart).
IDENTICAL_NODES = {"TORCH_ELASTIC_WORKER_IDENTICAL": "1"}
HOST = "127.0.0.1"
RDZV_BACKENDS = ("c10d", "etcd")
ETCD_MEMBERS = 3  # Raft: a majority of 3 survives any one node's loss
ETCD_READ_TIMEOUT_S = 0.5
READY_S = 120.0  # longest node 0 may take to host the rendezvous store (torch imports on a busy machine)
STOP_GRACE_S = 10.0  # a keeper asked to stop finishes its queued persists first


@dataclass
class Node:
    """One simulated node: its identity, its private keeper folder, its log and its processes."""

    index: int
    node_id: str
    keeper_dir: Path
    log: Path
    keeper: subprocess.Popen
    agent: subprocess.Popen
    etcd: subprocess.Popen | None = None  # its etcd member, under the etcd rendezvous
    template: subprocess.Popen | None = None  # its warm template


class LocalCluster:
    """N simulated nodes training one run; a context manager, so no process outlives a test.

    with LocalCluster(nodes=3, nproc_per_node=1, min_nodes=2, overrides=["train.device=cpu"]) as cluster:
        cluster.kill_node(2)      # SIGKILL a whole node; under c10d node 0 hosts the rendezvous: not that one
        cluster.add_node()        # a replacement joins at the next re-rendezvous
        codes = cluster.wait(timeout=600)
    """

    def __init__(
        self,
        *,
        nodes: int,
        nproc_per_node: int,
        overrides: Sequence[str] = (),
        min_nodes: int | None = None,
        max_nodes: int | None = None,
        max_restarts: int = 3,
        run_root: Path | str = "runs",
        name: str = "local",
        env: Mapping[str, str] | None = None,
        keeper_args: Sequence[str] = (),
        rdzv_conf: Mapping[str, object] = RDZV_CONF,
        keeper_cpus: Collection[int] | None = None,
        worker_cpus: Collection[int] | None = None,
        rdzv: str = "c10d",
        warm_template: bool = True,
    ) -> None:
        if rdzv not in RDZV_BACKENDS:
            raise ValueError(f"rdzv={rdzv!r}: expected one of {RDZV_BACKENDS}")
        self.max_nodes = nodes if max_nodes is None else max_nodes
        self.min_nodes = nodes if min_nodes is None else min_nodes
        if not 1 <= self.min_nodes <= nodes <= self.max_nodes:
            raise ValueError(
                f"need 1 <= min_nodes ({self.min_nodes}) <= nodes ({nodes}) <= max_nodes ({self.max_nodes})"
            )
        taken = [o for o in overrides if o.lstrip("+").split("=", 1)[0] in ("run.root", "run.name")]
        if taken:
            raise ValueError(
                f"{taken}: the cluster sets the run folder; pass run_root= / name= (--run-root / --name) instead"
            )
        self.nodes, self.nproc_per_node, self.max_restarts = nodes, nproc_per_node, max_restarts
        self.overrides, self.keeper_args = list(overrides), list(keeper_args)
        self.run_root, self.name = Path(run_root).absolute(), name
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            **NO_SHARED_STORE,
            **IDENTICAL_NODES,
            **(env or {}),
            "PYTHONUNBUFFERED": "1",
        }
        self.rdzv_conf = dict(rdzv_conf)
        # CPUs the keepers, and the agents with their workers, may run on (all when None): the nodes
        # share this machine's cores, real nodes' keepers code on host cores training leaves free.
        self.keeper_cpus, self.worker_cpus = keeper_cpus, worker_cpus
        self.rdzv, self.warm_template = rdzv, warm_template
        self.port = free_port()
        self.etcd_members = (
            [etcd.Member(f"node{i}", HOST, free_port(), free_port()) for i in range(min(nodes, ETCD_MEMBERS))]
            if rdzv == "etcd"
            else []
        )
        # Short: a Unix socket path must stay under ~100 characters, pytest's tmp paths do not.
        self.keeper_root = Path("/tmp") / f"resurgo-{os.getuid()}" / f"lc-{uuid.uuid4().hex[:8]}"
        self._nodes: list[Node] = []
        self._member_of: dict[int, etcd.Member] = {}  # node index -> the etcd member it runs
        self._members_lock = threading.Lock()  # a soak starts replacements beside its failures

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.name

    # ---- life cycle ----------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start every node, node 0 first: its agent hosts the c10d rendezvous store the others
        connect to; under etcd, the members first, every one healthy before an agent starts."""
        if self._nodes:
            raise RuntimeError("the cluster is already started: add_node() adds one more")
        try:
            members = {i: self._start_etcd_member(i, member) for i, member in enumerate(self.etcd_members)}
            templates = {i: self._start_template(i) for i in range(self.nodes) if self.warm_template}
            if members:
                etcd.wait_healthy(self.etcd_members, log=self.run_dir / "logs" / "node0.log")
            for index in range(self.nodes):
                self.add_node(etcd_member=members.get(index), template=templates.get(index))
            if not members:
                self._wait_for_store()
        except BaseException:
            self.stop()  # a context manager's exit does not run when entering fails
            raise
        return self

    def add_node(self, *, etcd_member: subprocess.Popen | None = None, template: subprocess.Popen | None = None) -> int:
        """Start one more node (a replacement joining later); returns its index. Under etcd a
        replacement takes over the member of a node that died, if one did (`_revive_member`)."""
        index = len(self._nodes)
        if etcd_member is None and self._nodes:
            etcd_member = self._revive_member(index)
        node_id, keeper_dir, log = self._node_paths(index)
        with open(log, "ab") as out:  # append mode: the keeper's and the agent's lines interleave, never overwrite
            spawn = self._spawn_args(index, out)
            if template is None and self.warm_template:
                template = self._start_template(index)
            if template is not None:
                spawn["env"][TEMPLATE_ENV] = str(self._template_socket(index))
                _wait_for_socket(self._template_socket(index), template, log)
            keeper = subprocess.Popen(
                [
                    *_on_cpus(self.keeper_cpus),
                    sys.executable,
                    "-m",
                    "resurgo.launch.keeper",
                    "--run-dir",
                    str(self.run_dir),
                    *self.keeper_args,
                ],
                **spawn,
            )
            agent = subprocess.Popen([*_on_cpus(self.worker_cpus), *self._agent_cmd(index)], **spawn)
        self._nodes.append(Node(index, node_id, keeper_dir, log, keeper, agent, etcd_member, template))
        return index

    def _node_paths(self, index: int) -> tuple[str, Path, Path]:
        """Node `index`'s identity, private keeper folder and log, the folders made."""
        node_id = f"node{index}"
        keeper_dir = self.keeper_root / node_id
        for folder in (self.keeper_root.parent, self.keeper_root, keeper_dir):
            folder.mkdir(mode=0o700, exist_ok=True)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        return node_id, keeper_dir, self.run_dir / "logs" / f"{node_id}.log"

    def _spawn_args(self, index: int, out) -> dict:
        """Popen arguments of a node's process: its environment (which `node_pids` finds it by), its log."""
        node_id, keeper_dir, _ = self._node_paths(index)
        env = {**self.env, "RESURGO_NODE_ID": node_id, "RESURGO_KEEPER_DIR": str(keeper_dir), "RESURGO_PEER_HOST": HOST}
        return dict(
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=self.run_root, start_new_session=True
        )

    def _start_etcd_member(self, index: int, member: etcd.Member) -> subprocess.Popen:
        with self._members_lock:
            self._member_of[index] = member
        with open(self._node_paths(index)[2], "ab") as out:
            data_dir = self.keeper_root / f"etcd-{member.name}"
            return etcd.spawn(
                member, self.etcd_members, data_dir, self.keeper_root.name, **self._spawn_args(index, out)
            )

    def _revive_member(self, index: int) -> subprocess.Popen | None:
        """Run, on new node `index`, the etcd member of a node that died (its processes all gone),
        under the member's name and address and on its data folder, as the machine itself would on
        a reboot from its disk: the member rejoins Raft, restoring the majority that lets the next
        node die. A stopped (hung) node's member still holds its address: it is revived only once
        that node is killed. None when no member is free."""
        with self._members_lock:
            held = {member for holder, member in self._member_of.items() if self.node_pids(holder)}
            free = next((m for m in self.etcd_members if m not in held), None)
            if free is None:
                return None
            self._member_of = {h: m for h, m in self._member_of.items() if m != free}
        proc = self._start_etcd_member(index, free)
        etcd.wait_healthy([free], log=self._node_paths(index)[2])
        return proc

    def _template_socket(self, index: int) -> Path:
        return self._node_paths(index)[1] / "template.sock"

    def _start_template(self, index: int) -> subprocess.Popen:
        sock = self._template_socket(index)
        cmd = [
            sys.executable,
            "-m",
            "resurgo.launch.warm_template",
            "--socket",
            str(sock),
            "--parent",
            str(os.getpid()),
        ]
        with open(self._node_paths(index)[2], "ab") as out:
            return subprocess.Popen([*_on_cpus(self.worker_cpus), *cmd], **self._spawn_args(index, out))

    @property
    def etcd_nodes(self) -> set[int]:
        """The nodes that run (or ran, until a replacement took it over) an etcd member: Raft
        survives the loss of fewer than half of the members."""
        with self._members_lock:
            return set(self._member_of)

    def _agent_cmd(self, index: int) -> list[str]:
        # c10d: is_host explicitly, so the other agents wait for node 0's store instead of racing to
        # host one. etcd: the node's own member, else (a node beyond the members, or a replacement
        # with no member to take over) a healthy one.
        # --local-addr: the address the workers' store is published at (the default, the fully
        # qualified hostname, may not resolve).
        if self.rdzv == "etcd":
            if (member := self._member_of.get(index)) is None:
                member = etcd.first_healthy(self.etcd_members)
            rdzv = ["--rdzv-backend=resurgo-etcd", f"--rdzv-endpoint={member.endpoint}"]
            # read_timeout: a request lost with etcd's leader is given up after half a second and sent
            # again (resurgo-etcd retries), rather than answered "timed out" by etcd after 5 to 7 s.
            conf = ",".join(f"{k}={v}" for k, v in {"read_timeout": ETCD_READ_TIMEOUT_S, **self.rdzv_conf}.items())
        else:
            rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint={HOST}:{self.port}"]
            conf = ",".join(f"{k}={v}" for k, v in {**self.rdzv_conf, "is_host": int(index == 0)}.items())
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.min_nodes}:{self.max_nodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--max-restarts={self.max_restarts}",
            *rdzv,
            f"--rdzv-id={self.name}",
            f"--rdzv-conf={conf}",
            f"--local-addr={HOST}",
            "-m",
            "resurgo.launch.train",
            f"run.root={self.run_root}",
            f"run.name={self.name}",
            "fault.keeper=external",
            *self.overrides,
        ]

    def _wait_for_store(self) -> None:
        deadline = time.monotonic() + READY_S
        while not _listening(self.port):
            if self._nodes[0].agent.poll() is not None:
                raise RuntimeError(
                    f"node 0's agent exited ({self._nodes[0].agent.returncode}) before hosting the "
                    f"rendezvous store:\n{self.output(0)[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"node 0 did not host the rendezvous store on port {self.port} within {READY_S:.0f} s; "
                    f"see {self._nodes[0].log}"
                )
            time.sleep(0.2)

    def wait(self, timeout: float | None = None) -> list[int | None]:
        """Every node's agent return code once all exited (-9: killed); TimeoutError if some still run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for node in self._nodes:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                node.agent.wait(timeout=left)
            except subprocess.TimeoutExpired:
                running = [n for n in self._nodes if n.agent.poll() is None]
                tails = "".join(f"\n--- the end of {n.log} ---\n{self.output(n.index)[-3000:]}" for n in running)
                raise TimeoutError(f"{[n.node_id for n in running]} still running after {timeout} s{tails}") from None
        return [node.agent.returncode for node in self._nodes]

    def poll(self) -> list[int | None]:
        """Every node's agent return code, None while it runs."""
        return [node.agent.poll() for node in self._nodes]

    def stop(self) -> None:
        """Kill what is left: nodes still training at once; idle keepers get SIGTERM first, to finish their persists."""
        for node in self._nodes:
            if node.agent.poll() is None:
                self.kill_node(node.index)
        for node in self._nodes:
            if node.keeper.poll() is None:
                node.keeper.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for node in self._nodes:
            try:
                node.keeper.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            self.kill_node(node.index)
        shutil.rmtree(self.keeper_root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- one node ------------------------------------------------------------------------------

    def kill_node(self, index: int) -> None:
        """SIGKILL the node's agent, its workers and its keeper, as a machine failure would; returns once all are gone.

        torchrun starts every worker in a session of its own, so killing the agent's process group
        would leave them running: the node's processes are found by their environment instead,
        which also finds workers the agent's death left to init.
        """
        node = self._nodes[index]
        for _ in range(5):
            pids = self.node_pids(index)
            if not pids:
                break
            # Stop first, so that no process forks or restarts a worker between being found and being killed.
            signal_all(pids, signal.SIGSTOP)
            pids |= self.node_pids(index)
            signal_all(pids, signal.SIGKILL)
            wait_gone(pids, timeout=10.0)
        for proc in (node.agent, node.keeper, node.etcd, node.template):
            if proc is not None:
                proc.wait(timeout=10.0)
        left = self.node_pids(index)
        if left:
            raise RuntimeError(f"{node.node_id}: processes {sorted(left)} survived SIGKILL")
        reclaim_stale(directory=node.keeper_dir)  # a killed keeper's memory: no later keeper of that node frees it here

    def freeze_node(self, index: int) -> None:
        """SIGSTOP the node's agent, workers and keeper: a hung machine, whose sockets stay open and
        whose peers see no error, only silence. `kill_node` (or `stop`) ends it later."""
        pids = self.node_pids(index)
        signal_all(pids, signal.SIGSTOP)
        signal_all(self.node_pids(index) - pids, signal.SIGSTOP)  # forked meanwhile

    def node_pids(self, index: int) -> set[int]:
        """The live processes of a node: its agent, keeper, workers and whatever they started."""
        node = self._nodes[index]
        marker = f"RESURGO_KEEPER_DIR={node.keeper_dir}".encode()
        found = {p.pid for p in (node.agent, node.keeper) if p.poll() is None}
        for pid in all_pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue  # gone, or another user's
            if marker in environ.split(b"\0"):
                found.add(pid)
        return {pid for pid in found | descendants(found) if pid != os.getpid() and process_alive(pid)}

    def node(self, index: int) -> Node:
        return self._nodes[index]

    def alive(self, *, every: bool = False) -> list[int]:
        """The indices of the nodes that run (of every node started, with `every`)."""
        return [n.index for n in self._nodes if every or self.node_pids(n.index)]

    def output(self, index: int) -> str:
        """Everything node `index`'s keeper and agent (with its workers) printed so far."""
        return self._nodes[index].log.read_text(errors="replace")

    def log_path(self, index: int) -> Path:
        return self._nodes[index].log


# ---- processes -------------------------------------------------------------------------------------


def _on_cpus(cpus: Collection[int] | None) -> list[str]:
    """A command prefix binding the command (and what it starts) to `cpus`; none when None."""
    if cpus is None:
        return []
    if shutil.which("taskset") is None:
        raise RuntimeError("binding nodes to CPUs needs taskset (util-linux)")
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cpus))]


def _wait_for_socket(path: Path, proc: subprocess.Popen, log: Path) -> None:
    """Until a node's template listens (it imports torch first: seconds on a loaded machine)."""
    deadline = time.monotonic() + READY_S
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the warm template exited ({proc.returncode}) before listening: see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the warm template did not listen at {path} within {READY_S:.0f} s: see {log}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    """Whether a socket listens on `port`, read from /proc: a probe connection would confuse the store."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


# ---- command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resurgo.launch.local_nodes",
        description=__doc__.split("\n\n")[0],
        epilog="Everything after -- goes to resurgo.launch.train (add train.device=cpu "
        "on a machine without enough GPUs).",
    )
    parser.add_argument("--nodes", type=int, required=True, help="simulated nodes started at once")
    parser.add_argument("--nproc-per-node", type=int, required=True, help="workers per node")
    parser.add_argument("--min-nodes", type=int, default=None, help="the fewest nodes that train on (default: --nodes)")
    parser.add_argument("--max-nodes", type=int, default=None, help="the most nodes (default: --nodes)")
    parser.add_argument("--max-restarts", type=int, default=3, help="worker group restarts per agent before it fails")
    parser.add_argument("--run-root", default="runs", help="run.root")
    parser.add_argument("--name", default="local", help="run.name and the rendezvous id")
    parser.add_argument(
        "--kill",
        default=[],
        action="append",
        metavar="NODE@STEP",
        help="SIGKILL node NODE (agent, workers, keeper) once step STEP is logged; repeatable",
    )
    parser.add_argument("--replace", action="store_true", help="start a replacement node after each kill")
    parser.add_argument(
        "--rdzv",
        choices=RDZV_BACKENDS,
        default="c10d",
        help="the rendezvous: c10d (its store in node 0) or etcd (members on the first 3 nodes; any node may die)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every worker")
    args = parser.parse_args(argv)
    try:
        args.kill = sorted((int(step), int(node)) for node, step in (k.split("@") for k in args.kill))
    except ValueError:
        parser.error(f"--kill takes NODE@STEP, e.g. 2@20; got {args.kill}")
    if args.rdzv == "c10d" and any(node == 0 for _, node in args.kill):
        parser.error("node 0 hosts the c10d rendezvous: kill another one, or use --rdzv etcd")
    return args


def logged_steps(run_dir: Path) -> int:
    """The newest step in the run's metrics (0 before the first)."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    try:
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (ValueError, KeyError):
        return 0  # a line being written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = LocalCluster(
        nodes=args.nodes,
        nproc_per_node=args.nproc_per_node,
        overrides=args.overrides,
        min_nodes=args.min_nodes,
        max_nodes=args.max_nodes,
        max_restarts=args.max_restarts,
        run_root=args.run_root,
        name=args.name,
        rdzv=args.rdzv,
    )
    with cluster:
        print(f"{args.nodes} nodes training {cluster.run_dir}; logs in {cluster.run_dir / 'logs'}", flush=True)
        try:
            for step, node in args.kill:
                while logged_steps(cluster.run_dir) < step and any(c is None for c in cluster.poll()):
                    time.sleep(0.2)
                cluster.kill_node(node)
                print(f"killed node{node} at step {logged_steps(cluster.run_dir)}", flush=True)
                if args.replace:
                    print(f"started replacement node{cluster.add_node()}", flush=True)
            codes = cluster.wait()
        except KeyboardInterrupt:
            print("interrupted: stopping every node", file=sys.stderr)
            return 130
    for node, code in enumerate(codes):
        print(f"node{node}: exit code {code}")
        if code != 0:
            print(cluster.output(node)[-3000:], file=sys.stderr)
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
