"""etcd members for the rendezvous: a store that survives the loss of any one node.

torchrun's c10d rendezvous keeps its state in a TCPStore inside one agent, on the node the launch
command names: when that node dies, every other agent loses the rendezvous and the whole job ends.
With the etcd rendezvous (`--rdzv-backend resurgo-etcd`, launch/etcd_rendezvous.py) the state lives in etcd instead, replicated by Raft across members on
several nodes; a majority of the members keeps it going, so with three members any one node may die,
the first included (five members: any two). Each member's node points its agent at its own member;
other nodes (more than the members, or a replacement joining later) at any live one. A member that
starts on its data folder rejoins with it (the machine rebooted); one that starts on an empty folder
while the others run is a new machine in a lost one's place: it takes over the lost member's seat
(etcd's member remove, then add) and catches up from the others.

Debian's `etcd-server` package (etcd 3.4) serves the v2 API, which torch's etcd-v2 backend speaks
through python-etcd, when started with --enable-v2. While the members have no leader nobody can
join a rendezvous, so the loss of the leader's node waits for an election: the members here send
heartbeats every HEARTBEAT_MS and elect a new leader ELECTION_MS after the last one they heard
(etcd's defaults, 100 ms and 1 s, are made for networks with up to ~10 ms between members; within one
cluster's network half of them is still ten times the round trip).

    python -m resurgo.launch.etcd --name node0 --cluster node0=10.0.0.1,node1=10.0.0.2,node2=10.0.0.3 \\
        --data-dir /var/tmp/etcd-demo --token demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLIENT_PORT, PEER_PORT = 2379, 2380
READY_S = 60.0
HEARTBEAT_MS, ELECTION_MS = 50, 500
INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install etcd-server) or put its folder on PATH"


@dataclass(frozen=True)
class Member:
    """One etcd member: its name (the node's identity) and where clients and the other members reach it."""

    name: str
    host: str
    client_port: int = CLIENT_PORT
    peer_port: int = PEER_PORT

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        """What torchrun's `--rdzv-endpoint` takes."""
        return f"{self.host}:{self.client_port}"


def parse_cluster(text: str) -> list[Member]:
    """`name=host[:client_port:peer_port],...` -> members; a clear ValueError for anything else."""
    members = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, where = item.partition("=")
        parts = where.split(":")
        if not sep or not name or not parts[0] or len(parts) not in (1, 3) or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"etcd cluster entry {item!r}: expected NAME=HOST or NAME=HOST:CLIENT_PORT:PEER_PORT")
        ports = (int(parts[1]), int(parts[2])) if len(parts) == 3 else (CLIENT_PORT, PEER_PORT)
        members.append(Member(name, parts[0], *ports))
    names = [m.name for m in members]
    if not members or len(set(names)) != len(names):
        raise ValueError(f"etcd cluster {text!r}: give one entry per member, with distinct names")
    return members


def format_cluster(members: Sequence[Member]) -> str:
    return ",".join(f"{m.name}={m.host}:{m.client_port}:{m.peer_port}" for m in members)


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found is None:
        raise FileNotFoundError(f"the etcd rendezvous needs the etcd server, which is not on PATH: {INSTALL_HINT}")
    return found


def command(
    member: Member,
    members: Sequence[Member],
    data_dir: Path | str,
    token: str,
    *,
    seats: Sequence[tuple[str, str]] | None = None,
) -> list[str]:
    """The etcd command line for `member` of the cluster `members`, its v2 API on.

    A data folder that already holds this member's state (the node restarted) rejoins the cluster
    with it; etcd then ignores the initial-cluster flags. `seats`: the running cluster's (name, peer
    URL) pairs, this member's included, which it joins instead of founding the cluster (`take_seat`)."""
    founding = seats is None
    seats = [(m.name, m.peer_url) for m in members] if seats is None else seats
    return [
        etcd_binary(),
        f"--name={member.name}",
        f"--data-dir={data_dir}",
        "--enable-v2=true",
        f"--listen-client-urls={member.client_url}",
        f"--advertise-client-urls={member.client_url}",
        f"--listen-peer-urls={member.peer_url}",
        f"--initial-advertise-peer-urls={member.peer_url}",
        "--initial-cluster=" + ",".join(f"{name}={url}" for name, url in seats),
        f"--initial-cluster-state={'new' if founding else 'existing'}",
        f"--initial-cluster-token={token}",
        f"--heartbeat-interval={HEARTBEAT_MS}",
        f"--election-timeout={ELECTION_MS}",
        "--log-level=warn",
    ]


def member_command(member: Member, members: Sequence[Member], data_dir: Path, token: str) -> list[str]:
    """How `member` starts: on its data folder, as it was; on an empty one, in the seat of the member of
    its name if that one ran before and the others run now (a new machine in a lost one's place),
    else as a founder (the cluster is starting, maybe with some founders up already)."""
    if data_dir.is_dir() and any(data_dir.iterdir()):
        return command(member, members, data_dir, token)
    # Any member that answers: its list of members is its own (no leader needed), while one that has
    # just lost its leader answers /health false for a second or two, and the cluster exists all the same.
    running = next((m for m in members if m.name != member.name and _get(m, "/v2/members", 1.0)), None)
    seats = take_seat(member, running) if running is not None else None
    return command(member, members, data_dir, token, seats=seats)


def take_seat(member: Member, running: Member) -> list[tuple[str, str]] | None:
    """Through the running cluster's member `running`: remove the member that held `member`'s name or
    address (lost with its machine) and add `member` in its place; the cluster's seats after that.
    None when that seat was never taken (a founder not started yet: it publishes its client URLs
    when it first runs), which `member` takes as a founder."""
    listed = json.loads(_call(running, "GET", "/v2/members"))["members"]
    held = [m for m in listed if m.get("name") == member.name or member.peer_url in m.get("peerURLs", [])]
    if not any(m.get("clientURLs") for m in held):
        return None
    deadline = time.monotonic() + READY_S
    for lost in held:
        _until(deadline, running, "DELETE", f"/v2/members/{lost['id']}", gone_ok=True)
    # A member added but never started has no name yet; etcd matches seats by address.
    seats = [(m.get("name") or f"unstarted-{m['id']}", m["peerURLs"][0]) for m in listed if m not in held]
    _until(deadline, running, "POST", "/v2/members", {"peerURLs": [member.peer_url]})
    return [*seats, (member.name, member.peer_url)]


def _until(deadline: float, member: Member, method: str, path: str, body: dict | None = None, *, gone_ok=False):
    """A change of members, asked again until `deadline`: etcd refuses one while its cluster elects a
    leader (the lost member may have led it), and adds a member only once the cluster has been whole
    for 5 s since the last change ("unhealthy cluster", strict reconfiguration). `gone_ok`: a removal
    answered 404 was done by an earlier try whose answer was lost."""
    while True:
        try:
            return _call(member, method, path, body)
        except RuntimeError as e:
            if gone_ok and ": 404 " in str(e):
                return b""
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _call(member: Member, method: str, path: str, body: dict | None = None) -> bytes:
    """One request to etcd's v2 members API; a RuntimeError saying what etcd answered when it refuses."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{member.client_url}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=READY_S) as reply:
            return reply.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"etcd member {member.name} refused {method} {path}: {e.code} {e.read()!r}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"etcd member {member.name} did not answer {method} {path}: {e}") from None


def healthy(member: Member, timeout: float = 1.0) -> bool:
    """Whether the member answers and its cluster has a leader (etcd's /health)."""
    return b'"true"' in (_get(member, "/health", timeout) or b"")


def _get(member: Member, path: str, timeout: float) -> bytes | None:
    try:
        with urllib.request.urlopen(f"{member.client_url}{path}", timeout=timeout) as reply:
            return reply.read()
    except (urllib.error.URLError, OSError):
        return None


def wait_healthy(members: Sequence[Member], *, timeout: float = READY_S, log: Path | None = None) -> None:
    """Return once every member answers healthy; TimeoutError naming the silent ones otherwise."""
    deadline = time.monotonic() + timeout
    waiting = list(members)
    while waiting:
        waiting = [m for m in waiting if not healthy(m)]
        if waiting and time.monotonic() > deadline:
            where = f"; see {log}" if log else ""
            raise TimeoutError(
                f"etcd members {[m.name for m in waiting]} not healthy within {timeout:.0f} s "
                f"(a member needs a majority of the cluster up to elect a leader){where}"
            )
        if waiting:
            time.sleep(0.1)


def first_healthy(members: Sequence[Member], *, timeout: float = READY_S) -> Member:
    """The first member that answers healthy (a node that runs none, or a replacement, talks to it:
    the client learns the other members from it); TimeoutError when none does within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        found = next((m for m in members if healthy(m)), None)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no etcd member of {format_cluster(members)} healthy within {timeout:.0f} s")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    """Become this node's etcd member (exec); or, for launch scripts, name a member's endpoint, find a
    healthy one or wait for one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", help="NAME=HOST[:CLIENT_PORT:PEER_PORT],... every member")
    parser.add_argument("--name", help="run this member, one of --cluster's")
    parser.add_argument("--data-dir", help="this member's state (reused when the node restarts)")
    parser.add_argument("--token", help="unique per job: members of two jobs never join each other")
    parser.add_argument("--endpoint-of", metavar="NAME", help="print NAME's client endpoint (nothing if no member)")
    parser.add_argument(
        "--first-healthy",
        action="store_true",
        help=f"print the endpoint of a healthy member (waits up to {READY_S:.0f} s)",
    )
    parser.add_argument(
        "--wait", metavar="HOST:PORT", help=f"wait up to {READY_S:.0f} s for the member there to be healthy"
    )
    args = parser.parse_args(argv)
    try:
        if args.wait:
            host, _, port = args.wait.rpartition(":")
            wait_healthy([Member(args.wait, host, int(port))])
            return 0
        members = parse_cluster(args.cluster or "")
        if args.endpoint_of:
            print(next((m.endpoint for m in members if m.name == args.endpoint_of), ""))
            return 0
        if args.first_healthy:
            print(first_healthy(members).endpoint)
            return 0
        if not (args.name and args.data_dir and args.token):
            parser.error("running a member needs --name, --data-dir and --token")
        member = next((m for m in members if m.name == args.name), None)
        if member is None:
            parser.error(f"--name {args.name} is not in --cluster {args.cluster}")
        cmd = member_command(member, members, Path(args.data_dir), args.token)
    except (ValueError, FileNotFoundError, TimeoutError, RuntimeError) as e:
        print(f"resurgo.launch.etcd: {e}", file=sys.stderr)
        return 2
    Path(args.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    os.execv(cmd[0], cmd)


def spawn(member: Member, members: Sequence[Member], data_dir: Path, token: str, **popen) -> subprocess.Popen:
    """Start `member` as a child process (the tests' and LocalCluster's form of `main`)."""
    cmd = member_command(member, members, data_dir, token)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return subprocess.Popen(cmd, **popen)


if __name__ == "__main__":
    sys.exit(main())
