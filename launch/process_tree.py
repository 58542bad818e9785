"""A node's processes as /proc shows them: every pid, a process's state and parent, the descendants
of a set of processes; signalling them and waiting until they are gone. What the local cluster uses
to kill or freeze a simulated node as a machine failure would: every process of it at once."""

from __future__ import annotations

import os
import time
from pathlib import Path

from resurgo.checkpoint import process_alive


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def state_and_parent(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[1])


def descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        stat = state_and_parent(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_gone(pids: set[int], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def with_environment(*entries: str) -> set[int]:
    """The live processes whose environment holds every `NAME=value` of `entries`."""
    want = {e.encode() for e in entries}
    found = set()
    for pid in all_pids():
        try:
            environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= environ and (state_and_parent(pid) or ("Z", 0))[0] not in ("Z", "X"):
            found.add(pid)
    return found


TRAIN_ENTRY = b"resurgo.launch.train"


def rank_process(*entries: str) -> int | None:
    """The process that trains the rank whose environment holds every `NAME=value` of `entries` (a
    marker of the run and `RANK=r`, say):
    the process torchrun started, or under warm restarts the worker it forked (the keeper a rank starts
    inherits the environment too, and outlives its parent, but runs another module). None while there
    is none."""
    procs = {pid for pid in with_environment(*entries) if TRAIN_ENTRY in _cmdline(pid)}
    parents = {pid: (state_and_parent(pid) or ("", 0))[1] for pid in procs}
    tops = [pid for pid in procs if parents[pid] not in procs]
    if len(tops) != 1:
        return None
    forks = [pid for pid in procs if parents[pid] == tops[0]]
    return forks[0] if forks else tops[0]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
