"""A node's processes as /proc shows them: every pid, a process's state and parent, the descendants
of a set of processes; signalling them and waiting until they are gone. What the local cluster uses
to kill or freeze a simulated node as a machine failure would: every process of it at once."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

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
WORKER_NAME = "rsg-worker"  # a warm worker's process name, with its local rank (`ps -e` shows it)
STORE_NAME = "rsg-store"  # the process that serves a warm job's store beside rank 0's supervisor
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15


def worker_name(local_rank: int) -> str:
    return f"{WORKER_NAME}{local_rank}"[:15]  # the kernel keeps 15 characters


def name_this_process(name: str) -> None:
    """Set this process's name as `ps` and /proc/PID/comm show it (its command line stays)."""
    _prctl(PR_SET_NAME, name.encode()[:15])


def exit_now(code: int | str | None) -> NoReturn:
    """End this process at once with `code` (SystemExit's forms), its output and logs flushed. The
    interpreter's teardown is skipped: with torch loaded it collects garbage for a second or more
    per process, and every resource a finished run holds was released explicitly before this."""
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing more can be said on it
    os._exit(status)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this (forked) process when its parent dies; exit now if it already did."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _prctl(option: int, arg: object) -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg)


def rank_process(*entries: str, local_rank: int) -> int | None:
    """The process that trains local rank `local_rank` among those whose environment holds every
    `NAME=value` of `entries` (a marker of the run or the node, say). Under warm restarts, the worker a
    supervisor forked, found by its name (one a warm template forked shows the template's environment,
    not the rank's); else the process torchrun started (the keeper a rank starts inherits the
    environment too, and outlives its parent, but runs another module). None while there is not
    exactly one."""
    procs = with_environment(*entries)
    workers = [pid for pid in procs if _comm(pid) == worker_name(local_rank)]
    if workers:
        return workers[0] if len(workers) == 1 else None
    started = with_environment(*entries, f"LOCAL_RANK={local_rank}")
    tops = [pid for pid in started if TRAIN_ENTRY in _cmdline(pid)]
    return tops[0] if len(tops) == 1 else None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
