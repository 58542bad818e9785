"""`resurgo-keeper` / `python -m resurgo.launch.keeper`: the per-node process that holds snapshots.

Workers start one on their own (`fault.keeper=auto`); launch scripts that manage processes start
one per node before the workers (`fault.keeper=external`):

    resurgo-keeper --run-dir runs/demo &
    torchrun ... -m resurgo.launch.train run.name=demo fault.keeper=external

It exits when every local rank of the run finished (after its last persist is committed), when the
workers and the process that could restart them are gone, after `--idle-timeout` seconds without
workers (the lease, `fault.keeper_lease_s`), or on SIGTERM/SIGINT; a second keeper of the same run on
the same node exits at once. What a node's keepers hold, and stopping them:

    resurgo-keeper list
    resurgo-keeper stop runs/demo        # or a run id from the list, or --all
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from resurgo.checkpoint import Keeper, KeeperRunning, node_keepers, process_alive, reclaim_stale, run_id
from resurgo.launch.process_tree import exit_now

STOP_WAIT_S = 30.0  # a stopping keeper finishes the persists under way; then it is killed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="resurgo-keeper", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run-dir", required=True, type=Path, help="the run folder (run.root/run.name) the workers use"
    )
    parser.add_argument(
        "--host-memory-gb",
        type=float,
        default=0.0,
        help="snapshot budget for this node; 0: what the workers ask (checkpoint.host_memory_gb)",
    )
    parser.add_argument(
        "--slots", type=int, default=0, help="snapshot buffers per rank (>= 2); 0: from the budget, at most 3"
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=900.0,
        help="the lease: exit after this many seconds without workers (the workers' fault.keeper_lease_s overrides it)",
    )
    parser.add_argument("--stay", action="store_true", help="keep running when every local rank finished")
    parser.add_argument(
        "--auto",
        action="store_true",
        help="started by a worker (fault.keeper=auto): exit as soon as no worker is connected and nothing is worth keeping",
    )
    return parser.parse_args(argv)


def list_keepers() -> int:
    keepers = node_keepers()
    if not keepers:
        print("no keeper on this node")
        return 0
    print(f"{'run':<36} {'pid':>8}  {'state':<8} {'segments':>8} {'GiB':>8}")
    for k in keepers:
        state = "running" if k.alive else "dead"
        print(f"{k.run:<36} {k.pid or '-':>8}  {state:<8} {k.segments:>8} {k.nbytes / 2**30:>8.3f}")
    return 0


def stop_keepers(argv: list[str]) -> int:
    """SIGTERM the chosen keepers (they finish their persists), SIGKILL what is left after STOP_WAIT_S,
    then free what dead keepers left."""
    parser = argparse.ArgumentParser(
        prog="resurgo-keeper stop", description="stop this node's keepers of the given runs"
    )
    parser.add_argument("runs", nargs="*", help="run folders (run.root/run.name) or run ids from `resurgo-keeper list`")
    parser.add_argument("--all", action="store_true", help="every keeper of this node")
    args = parser.parse_args(argv)
    if not args.runs and not args.all:
        parser.error("name the runs to stop, or --all")
    wanted = {run_id(r) if os.sep in r or os.path.exists(r) else r for r in args.runs}  # a run id has no slash
    pids = {k.pid for k in node_keepers() if k.alive and k.pid and (args.all or k.run in wanted)}
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while any(map(process_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in filter(process_alive, pids):
        print(f"keeper {pid} did not stop within {STOP_WAIT_S:.0f} s: killed", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    reclaim_stale(own="")
    print(f"stopped {len(pids)} keeper(s)" if pids else "no running keeper matched")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"]:
        return list_keepers()
    if argv[:1] == ["stop"]:
        return stop_keepers(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s keeper[%(process)d] %(levelname)s %(message)s", stream=sys.stderr
    )
    keeper = Keeper(
        run_dir=args.run_dir,
        host_memory_bytes=int(args.host_memory_gb * 2**30),
        slots=args.slots,
        idle_timeout_s=args.idle_timeout,
        exit_when_finished=not args.stay,
        auto=args.auto,
    )
    try:
        keeper.start()
    except KeeperRunning as e:
        logging.info("%s: nothing to do", e)
        return 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: keeper.request_stop())
    keeper.serve_forever()
    return 0


if __name__ == "__main__":
    exit_now(main())  # its memory and socket are freed by now: the teardown would only collect garbage
