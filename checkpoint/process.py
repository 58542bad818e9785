"""Whether a process lives, as a keeper, a launcher or a save's writer needs to know."""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, or a dying process does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False  # gone between the two looks
    except (OSError, IndexError):
        return True  # no /proc: kill(0) answered


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
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


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
