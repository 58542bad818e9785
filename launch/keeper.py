"""`resurgo-keeper` / `python -m resurgo.launch.keeper`: the per-node process that holds snapshots.

Workers start one on their own (`fault.keeper=auto`); launch scripts that manage processes start
one per node before the workers (`fault.keeper=external`):

    resurgo-keeper --run-dir runs/demo &
    torchrun ... -m resurgo.launch.train run.name=demo fault.keeper=external

It exits when every local rank of the run finished (after its last persist is committed), after
`--idle-timeout` seconds without workers, or on SIGTERM/SIGINT; a second keeper of the same run on
the same node exits at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from resurgo.checkpoint.keeper import Keeper, KeeperRunning


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="resurgo-keeper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="the run folder (run.root/run.name) the workers use")
    parser.add_argument("--host-memory-gb", type=float, default=0.0,
                        help="snapshot budget for this node; 0: what the workers ask (checkpoint.host_memory_gb)")
    parser.add_argument("--slots", type=int, default=0, help="snapshot buffers per rank (>= 2); 0: from the budget, at most 3")
    parser.add_argument("--idle-timeout", type=float, default=900.0, help="exit after this many seconds without workers")
    parser.add_argument("--stay", action="store_true", help="keep running when every local rank finished")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s keeper[%(process)d] %(levelname)s %(message)s", stream=sys.stderr)
    keeper = Keeper(
        run_dir=args.run_dir, host_memory_bytes=int(args.host_memory_gb * 2**30), slots=args.slots,
        idle_timeout_s=args.idle_timeout, exit_when_finished=not args.stay,
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
    sys.exit(main())
