"""The warm template: ranks forked from a process that imported everything once, standing in for the
processes torchrun starts (arguments, streams, exit status and signals pass through)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from resurgo.checkpoint import process_alive
from resurgo.launch.warm_template import LAUNCHER_ENV, TEMPLATE_ENV

RANK_MODULE = f"""
import os, sys, time
from pathlib import Path

def main():
    out = Path(os.environ["RANK_OUT"])
    out.write_text(repr((sys.argv[1:], os.getcwd(), os.environ["ASKED"], os.getpid(), os.environ["{LAUNCHER_ENV}"])))
    print("hello from the rank", flush=True)
    if sys.argv[1] == "sleep":
        time.sleep(120)
    sys.exit(int(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A template serving this module's ranks; its socket path."""
    folder = tmp_path_factory.mktemp("template")
    (folder / "fake_rank.py").write_text(textwrap.dedent(RANK_MODULE))
    sock = folder / "template.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "resurgo.launch.warm_template", "--socket", str(sock)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    yield sock
    proc.kill()
    proc.wait(timeout=10)


def thin(sock: Path | None, tmp_path: Path, *args: str) -> subprocess.Popen:
    """What torchrun would start: a process that asks the template for its rank."""
    code = (
        "import sys; from resurgo.launch.warm_template import run_in_template as r; sys.exit(r(sys.argv, 'fake_rank'))"
    )
    env = {**os.environ, "RANK_OUT": str(tmp_path / "rank.txt"), "ASKED": "yes"}
    if sock is not None:
        env[TEMPLATE_ENV] = str(sock)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rank_report(tmp_path: Path, timeout: float = 30) -> tuple:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ast.literal_eval((tmp_path / "rank.txt").read_text())
        except (OSError, SyntaxError, ValueError):  # not yet written, or being written
            assert time.monotonic() < deadline, "the rank never started"
            time.sleep(0.02)


def test_the_rank_runs_with_the_thin_process_arguments_folder_environment_and_streams(template, tmp_path):
    proc = thin(template, tmp_path, "exit", "3")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err  # the rank's exit code is the thin process's
    argv, cwd, asked, pid, launcher = rank_report(tmp_path)
    assert argv == ["exit", "3"] and cwd == str(tmp_path) and asked == "yes"
    assert pid != proc.pid and int(launcher) == os.getpid()  # forked by the template; torchrun's agent here: the test
    assert out == "hello from the rank\n"  # written straight into the thin process's stdout


@pytest.mark.parametrize("victim", ["rank", "thin"])
def test_a_killed_rank_or_thin_process_takes_the_other_with_it(template, tmp_path, victim):
    proc = thin(template, tmp_path, "sleep", "0")
    rank = rank_report(tmp_path)[3]
    os.kill(rank if victim == "rank" else proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, proc.stderr.read()  # torchrun sees the rank's own death
    deadline = time.monotonic() + 10
    while process_alive(rank):  # a rank whose thin process died never trains beside its successor
        assert time.monotonic() < deadline, "the rank outlived its thin process"
        time.sleep(0.02)


def test_torchrun_stopping_the_thin_process_stops_the_rank(template, tmp_path):
    proc = thin(template, tmp_path, "sleep", "0")
    rank = rank_report(tmp_path)[3]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert not process_alive(rank)


def test_without_a_template_the_process_says_so_and_runs_the_rank_itself(tmp_path):
    missing = tmp_path / "nobody.sock"
    proc = subprocess.run(
        [sys.executable, "-c", "from resurgo.launch.warm_template import run_in_template as r; print(r([], 'x'))"],
        env={**os.environ, TEMPLATE_ENV: str(missing)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        proc.stdout == "None\n" and f"no warm template at {missing}" in proc.stderr and "starting cold" in proc.stderr
    )
