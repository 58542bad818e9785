"""A warm template per node: ranks forked from a process that already imported torch and resurgo.

Every rank torchrun starts, first or after a failure, pays for an interpreter, `import torch`, FSDP2's
lazy imports and resurgo's own: seconds per restart, where restoring from memory takes a tenth of
one. After a lost node torchrun's restart cannot be avoided (the world changes, and only its
re-rendezvous agrees on the new one; a crashed rank is restarted warm, `launch/warm.py`), but its cost
can: each node runs one template
(`python -m resurgo.launch.warm_template`, started beside the keeper by `launch/multinode.sh` and
`LocalCluster`), which imports everything once and waits. The process torchrun starts for a rank
(`python -m resurgo.launch.train`, unchanged) finds the template's socket (RESURGO_WARM_TEMPLATE),
and, instead of importing anything, hands the template its arguments, its environment, its working
folder and its standard streams; the template forks the real rank from its warm state (about 20 ms)
and tells it the rank's pid and, at the end, its exit status, which the thin process takes as its
own. To torchrun nothing changed: its process runs, is signalled and exits as before.

Ending: a signal torchrun sends the thin process is passed on to the rank; a thin process that dies
(SIGKILL) closes its connection, and its rank, watching the connection, kills itself; a template
that dies takes its ranks with it (they ask for SIGKILL on their parent's death). No template, or
one that does not answer: the thin process says so and trains itself, cold.

The template never initialises CUDA or starts a thread: a fork keeps one thread, and a CUDA context
does not survive a fork.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

TEMPLATE_ENV = "RESURGO_WARM_TEMPLATE"  # the node's template socket, for the processes torchrun starts
LAUNCHER_ENV = "RESURGO_LAUNCHER_PID"  # a forked rank's torchrun agent (checkpoint/process.py reads it)
CONNECT_S = 5.0
POLL_S = 0.02
PR_SET_PDEATHSIG = 1
MAX_REQUEST = 1 << 20


# ---- the thin side: the process torchrun starts ------------------------------------------------------


def run_in_template(argv: list[str], module: str = "resurgo.launch.training") -> int | None:
    """Have this node's template call `module`'s main() with `argv` as sys.argv, in a rank forked from
    it: the rank's exit code, or None when there is no template to ask (call it here)."""
    path = os.environ.get(TEMPLATE_ENV)
    if not path:
        return None
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(CONNECT_S)
        conn.connect(path)
        env = {**os.environ, LAUNCHER_ENV: str(os.getppid())}
        request = json.dumps({"module": module, "argv": argv, "env": env, "cwd": os.getcwd()}).encode()
        socket.send_fds(conn, [len(request).to_bytes(4, "big") + request], [0, 1, 2])
        pid = int(_read_message(conn)["pid"])
    except (OSError, ValueError, KeyError) as e:
        print(f"[resurgo.warm_template] no warm template at {path} ({e}): starting cold", file=sys.stderr, flush=True)
        return None
    conn.settimeout(None)  # the rank's life: it ends with a status, or EOF when the template dies
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda number, _frame: _pass_on(pid, number))
    try:
        status = int(_read_message(conn)["status"])
    except (OSError, ValueError, KeyError):
        print(f"[resurgo.warm_template] the template at {path} died: rank pid {pid} went with it", file=sys.stderr)
        return 1
    if os.WIFSIGNALED(status):  # die the same way, so torchrun sees what the rank saw
        number = os.WTERMSIG(status)
        if number != signal.SIGKILL:
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        return 128 + number
    return os.WEXITSTATUS(status)


def _pass_on(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def _read_message(conn: socket.socket, head: bytes | None = None) -> dict:
    """One length-prefixed JSON message; `head`: its 4-byte length, when already read."""
    size = int.from_bytes(_read_exactly(conn, 4) if head is None else head, "big")
    if size > MAX_REQUEST:
        raise ValueError(f"a message of {size} bytes: not the template's protocol")
    return json.loads(_read_exactly(conn, size))


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the connection closed")
        data += chunk
    return data


def _send_message(conn: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    conn.sendall(len(data).to_bytes(4, "big") + data)


# ---- the template ----------------------------------------------------------------------------------


def preload() -> None:
    """What a rank would import after each failure, imported once; no CUDA, no thread. Hydra's first
    composition also finds its plugins and imports its config machinery (a few tenths of a second,
    more on a busy node): done here once, each rank's own composition takes half as long."""
    from hydra import compose, initialize_config_module

    from resurgo.launch import training, warm  # noqa: F401  torch, hydra and all of resurgo's training

    warm.preload()
    with initialize_config_module(version_base=training.HYDRA_VERSION, config_module=training.RECIPES):
        compose(config_name=training.CONFIG_NAME)


def serve(path: Path, *, parent: int) -> int:
    """Fork a rank for every thin process that connects, until `parent` (the node's launcher) is gone."""
    preload()
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    listener.setblocking(False)
    ranks: dict[int, socket.socket] = {}  # rank pid -> its thin process's connection
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    _say(f"ready at {path}, pid {os.getpid()}")
    try:
        while parent == 0 or _alive(parent):
            if selector.select(timeout=POLL_S):
                _accept(listener, ranks)
            _reap(ranks)
    finally:
        for pid in ranks:
            _pass_on(pid, signal.SIGKILL)
        path.unlink(missing_ok=True)
    return 0


def _accept(listener: socket.socket, ranks: dict[int, socket.socket]) -> None:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return
    conn.setblocking(True)
    conn.settimeout(CONNECT_S)
    try:
        head, fds, _, _ = socket.recv_fds(conn, 4, 3)
        if len(head) != 4 or len(fds) != 3:
            raise ValueError("no request")
        request = _read_message(conn, head)
    except (OSError, ValueError) as e:
        _say(f"a request that did not follow the protocol was dropped ({e})")
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        listener.close()
        for other in ranks.values():  # the template's ends of other ranks' connections: never held by this one
            other.close()
        _become_rank(conn, fds, request)  # never returns
    for fd in fds:
        os.close(fd)
    conn.settimeout(None)
    try:
        _send_message(conn, {"pid": pid})
    except OSError:
        pass  # the thin process is gone: its rank sees the connection closed and ends
    ranks[pid] = conn


def _reap(ranks: dict[int, socket.socket]) -> None:
    while ranks:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = ranks.pop(pid, None)
        if conn is not None:
            try:
                _send_message(conn, {"status": status})
            except OSError:
                pass
            conn.close()


def _become_rank(conn: socket.socket, fds: list[int], request: dict) -> None:
    """In the forked child: take the thin process's streams, folder, environment and arguments, then train."""
    code = 1
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the template's death takes this rank with it
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _watch_thin_process(conn)
        importlib.import_module(request["module"]).main()
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        from .process_tree import exit_now  # here: a thin process imports this module, and no more

        exit_now(code)


def _watch_thin_process(conn: socket.socket) -> None:
    """A thread that ends this rank when its thin process dies (its connection closes): torchrun
    then believes the rank gone, and a rank left running would train beside its successor."""
    import threading

    conn.settimeout(None)  # the template's request timeout came along with the fork: this wait has none

    def watch() -> None:
        try:
            while conn.recv(1 << 12):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="resurgo-thin-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def say(source: str, message: str) -> None:
    """One line on stderr, stamped to the ms like the logs' lines (the benchmarks read the times)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
    print(f"[{stamp}][{source}] {message}", file=sys.stderr, flush=True)


def _say(message: str) -> None:
    say("resurgo.warm_template", message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help=f"where to listen; the ranks find it in ${TEMPLATE_ENV}")
    parser.add_argument(
        "--parent", type=int, default=None, help="exit once this pid is gone (default: this process's parent)"
    )
    args = parser.parse_args(argv)
    return serve(Path(args.socket), parent=os.getppid() if args.parent is None else args.parent)


if __name__ == "__main__":
    sys.exit(main())
