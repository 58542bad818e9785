"""Whether a process lives, as a keeper, a launcher or a save's writer needs to know."""

from __future__ import annotations

import os
import time
from pathlib import Path

PF_EXITING = 0x4  # a thread's kernel flag (/proc/PID/stat's 9th field): it is in the exit path
ENDED = ("Z", "X")  # a zombie (dead, not yet reaped) or being reaped


def _stat(path: str) -> list[str] | None:
    """The fields of a /proc/.../stat file from the state on (the 3rd field), None if it is gone."""
    try:
        return Path(path).read_text().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    except (OSError, IndexError):
        return None


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, or a dying process does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat(f"/proc/{pid}/stat")
    if fields is None:  # gone between the two looks, unless there is no /proc to look in
        return not Path("/proc/self").exists()
    return fields[0] not in ENDED


def exit_begun(pid: int) -> int | None:
    """`pid`'s wait status (as `waitpid` gives it) once none of its threads can run its code again:
    each is in the kernel's exit path, or the process is a zombie. The kernel frees a dead process's
    memory before `waitpid` returns (about 0.1 s per GiB); a fence needs only this. None while a
    thread still runs or the process is gone."""
    main = _stat(f"/proc/{pid}/stat")
    if main is None or (main[0] not in ENDED and not int(main[6]) & PF_EXITING):
        return None
    if main[0] not in ENDED:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None
        for tid in threads:
            fields = _stat(f"/proc/{pid}/task/{tid}/stat")
            if fields is not None and fields[0] not in ENDED and not int(fields[6]) & PF_EXITING:
                return None
    return int(main[49]) if len(main) > 49 else None  # exit_code, Linux 3.5 on


FENCED_ENV = "RESURGO_FENCED_PIDS"  # a warm worker's predecessors, fenced but maybe still freeing memory


def wait_released(pids: list[int], *, timeout_s: float, why: str) -> None:
    """Wait until each of `pids` is gone or a zombie (its memory, and its device's, freed); a
    TimeoutError naming them after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while held := [pid for pid in pids if process_alive(pid)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pids {held} still hold their memory {timeout_s:.0f} s after they were ended ({why})")
        time.sleep(0.01)


GENERATION_ENV = "RESURGO_GENERATION"  # set by a warm restart's supervisor in the workers it forks


def incarnation() -> tuple[int, int]:
    """(torchrun's restart count, the warm-restart generation) of this worker: (0, 0) for a first start."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), int(os.environ.get(GENERATION_ENV, "0"))


def store_attempt() -> int:
    """The attempt that keeps this worker's keys apart from its predecessors' in the workers' store:
    torchrun's restart count where that store outlives a restart (the agent's own, shared: one
    node, one count), else 0 (each round's store is new, and each node's agent counts its own
    restarts, so the counts of two nodes differ)."""
    return incarnation()[0] if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0


def parent_of(pid: int) -> int:
    """`pid`'s parent process (0 when it is gone)."""
    fields = _stat(f"/proc/{pid}/stat")
    return int(fields[1]) if fields is not None else 0


def supervisor_pid() -> int:
    """The warm-restart supervisor that forked this worker, 0 when none did."""
    return os.getppid() if GENERATION_ENV in os.environ else 0


LAUNCHER_ENV = "RESURGO_LAUNCHER_PID"  # set in a rank forked by a warm template: its torchrun agent


def launcher_pid() -> int:
    """The process that restarts this worker when it fails: its torchrun agent (the supervisor's parent
    under warm restarts; named in the environment of a rank a warm template forked), else nobody but itself."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return os.getpid()
    if LAUNCHER_ENV in os.environ:
        return int(os.environ[LAUNCHER_ENV])
    supervisor = supervisor_pid()
    return parent_of(supervisor) if supervisor else os.getppid()
