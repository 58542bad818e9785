"""What a run leaves behind, read while it runs: its step records, and when things happened from its
logs: resurgo's own lines (Python logging, the warm-restart supervisors' and the keepers') and
torchrun's (glog), as Unix times."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

# "[2026-12-06 10:12:21,605][logger][INFO] - ..." (Hydra's format) and "2026-12-06 10:12:21,605 keeper[..] ..."
PY_STAMP = r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]?"
# "E1206 10:49:46.108000 32382 .../api.py:1002] failed (exitcode: -9) ..."
GLOG_FAIL = re.compile(r"^E(\d\d)(\d\d) (\d\d:\d\d:\d\d\.\d+) .*failed \(exitcode", re.M)
GLOG_STOP = re.compile(r"^W(\d\d)(\d\d) (\d\d:\d\d:\d\d\.\d+) .*Sending process \d+ closing signal SIGTERM", re.M)
RESUME = re.compile(r"^\[(?P<t>[^\]]+)\]\[[^\]]+\]\[INFO\] - resume: (?P<what>.*) in (?P<s>[\d.]+) s$", re.M)


def records(run_dir: Path) -> list[dict]:
    """The run's step records so far (a line being written is left out)."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def py_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def glog_time(m: re.Match) -> float:
    year = datetime.now().year
    return datetime.strptime(f"{year}-{m[1]}-{m[2]} {m[3]}", "%Y-%m-%d %H:%M:%S.%f").timestamp()


def stamped(text: str, pattern: str) -> list[float]:
    """When each line of `text` that matches `pattern` after its time stamp was written, in order."""
    return sorted(py_time(m[1]) for m in re.finditer(PY_STAMP + r"[^\n]*?(?:" + pattern + ")", text, re.M))


def restarts_seen(text: str) -> list[float]:
    """When torchrun saw a worker fail, or stopped its workers for a new rendezvous round (the
    survivors of a lost node can learn of it from the rendezvous before any collective fails)."""
    return sorted(glog_time(m) for pattern in (GLOG_FAIL, GLOG_STOP) for m in pattern.finditer(text))


def resumes(text: str) -> list[float]:
    """When each start of the job finished its restore (rank 0's log)."""
    return [py_time(m["t"]) for m in RESUME.finditer(text)]
