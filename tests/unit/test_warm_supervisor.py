"""The warm-restart supervisors' own parts, without torchrun: the store that outlives every worker
on several nodes, the error record handed to torchrun only whole, and the fence that returns once a
worker runs no more code rather than once the kernel has freed its memory."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from resurgo.checkpoint import exit_begun, process_alive, wait_released
from resurgo.launch import warm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def several_nodes(monkeypatch):
    """The environment torchrun gives a worker when each round's store is new (several nodes)."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")  # this node's own count: not in the keys
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("WORLD_SIZE", "2")
    return monkeypatch


def test_rank_0s_supervisor_serves_the_store_until_every_worker_finished(several_nodes):
    several_nodes.setenv("RANK", "0")
    host = warm.Generations()
    assert host.host and process_alive(host.host)
    several_nodes.setenv("RANK", "1")
    several_nodes.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # another node restarted less often
    peer = warm.Generations()
    assert peer.host == 0 and peer.key == host.key
    assert peer.advance(0) == 1 and host.current() == 1  # a warm restart seen by both
    assert host.advance(0) == 1  # opened once, whoever asks second
    peer.finished()  # returns at once: it serves nothing
    assert process_alive(host.host)
    host.finished()  # both finished: the host goes
    assert not process_alive(host.host)
    with pytest.raises(warm.StoreGone):
        peer.current()


@pytest.mark.parametrize("record", ['{"message": "boom"}', '{"mess'], ids=["whole", "cut short"])
def test_only_a_whole_error_record_reaches_torchrun(monkeypatch, tmp_path, record):
    torchrun_file = tmp_path / "error.json"
    monkeypatch.setenv(warm.ERROR_FILE_ENV, str(torchrun_file))
    warm._worker_error_file().write_text(record)
    warm._hand_over_error_file()
    assert not warm._worker_error_file().exists()
    if record.endswith("}"):
        assert json.loads(torchrun_file.read_text()) == {"message": "boom"}
    else:
        assert not torchrun_file.exists()  # torchrun's agent dies on a record it cannot parse


def _child(body) -> int:
    """Fork a child that runs `body` and exits; returns once it runs."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            body(write)
        finally:
            os._exit(3)
    os.close(write)
    assert os.read(read, 1) == b"r"
    os.close(read)
    return pid


def _hold_memory_and_wait(ready: int) -> None:
    held = b"\1" * (256 * 2**20)  # memory the kernel frees after the fence has returned
    os.write(ready, b"r")
    while held:
        time.sleep(1)


def test_a_fenced_worker_runs_no_more_code_at_once_and_is_reaped_later():
    pid = _child(_hold_memory_and_wait)
    assert exit_begun(pid) is None  # it runs
    dying: set[int] = set()
    warm._fence(pid, dying)
    assert pid not in dying or exit_begun(pid) == signal.SIGKILL  # reaped already, or every thread exits
    warm._reap(dying, wait_s=10)
    assert not dying and not process_alive(pid)


def test_how_a_worker_ended_is_known_before_it_is_reaped():
    pid = _child(lambda ready: os.write(ready, b"r"))
    deadline = time.monotonic() + 10
    while (status := exit_begun(pid)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    assert os.waitpid(pid, 0) == (pid, status)  # the kernel's own word agrees


def test_a_cuda_successor_waits_until_its_predecessors_memory_is_back():
    pid = _child(_hold_memory_and_wait)
    with pytest.raises(TimeoutError, match=f"pids \\[{pid}\\] still hold their memory"):
        wait_released([pid], timeout_s=0.2, why="a test")
    dying: set[int] = set()
    warm._fence(pid, dying)
    wait_released([pid], timeout_s=10, why="a test")  # returns once it is a zombie, reaped or not
    warm._reap(dying, wait_s=10)
