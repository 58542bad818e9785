"""What a keeper watches so that no failure waits on a collective timeout: its ranks' progress and its peers.

A hung rank (a stopped process, a deadlock, a collective waiting for a node that vanished without
closing its sockets) fails nothing by itself: its sockets stay open, so its peers wait in their
collectives. The keeper sees it without taking part in them. Every local rank tells it the step it
finished (`beat`); a rank silent for `timeout_s` since its last step, or a peer node's keeper that
has not answered a ping for `peer_timeout_s` (seconds: a keeper answers from a thread of its own, so
its silence is its node's), is reported by `trouble()`, and the keeper ends its local ranks
so that the launcher's restart and the recovery from memory take over. A rank is watched from its
first step (start-up and restores wait in collectives that the process-group timeout bounds), and a
peer once a plan names it; a peer reported once is not reported again until it answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import NamedTuple

from ..erasure.wire import unreachable

PING_S = 0.5  # between pings of each peer keeper


class Trouble(NamedTuple):
    reason: str
    peer_lost: bool  # a peer node, not a local rank: the world must shrink


class HangWatch:
    def __init__(self, *, timeout_s: float = 0.0, peer_timeout_s: float = 0.0) -> None:
        self.timeout_s = timeout_s  # ranks; 0: watch nothing
        self.peer_timeout_s = peer_timeout_s  # peer keepers; 0: timeout_s
        self._beats: dict[int, tuple[float, int]] = {}  # rank -> (when, step) of its last finished step
        self._lock = threading.Lock()
        self._peers: dict[str, str] = {}  # node -> keeper address, of the running plan
        self._answered: dict[str, float] = {}  # node -> when it last answered a ping
        self._reported: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ping_loop, name="resurgo-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # ---- local ranks --------------------------------------------------------------------------

    def beat(self, rank: int, step: int) -> None:
        with self._lock:
            self._beats[rank] = (time.monotonic(), step)

    def excuse(self, rank: int) -> None:
        """`rank` waits for the keeper itself (backpressure from a persist): that is not a hang."""
        with self._lock:
            if rank in self._beats:
                self._beats[rank] = (time.monotonic(), self._beats[rank][1])

    def forget(self, ranks: set[int] | None = None) -> None:
        """Stop watching `ranks` (all when None): they finished, or were ended."""
        with self._lock:
            for rank in list(self._beats) if ranks is None else ranks:
                self._beats.pop(rank, None)

    # ---- peers ----------------------------------------------------------------------------------

    def watch_peers(self, peers: Mapping[str, str]) -> None:
        """Ping these peer keepers (node -> address) from now on; an empty mapping stops pinging."""
        with self._lock:
            now = time.monotonic()
            self._answered = {node: self._answered.get(node, now) if node in self._peers else now for node in peers}
            self._peers = dict(peers)

    def silent(self, seconds: float) -> set[str]:
        """The watched peers whose keeper has not answered a ping for `seconds`."""
        now = time.monotonic()
        with self._lock:
            return {node for node, when in self._answered.items() if now - when > seconds}

    # ---- verdict --------------------------------------------------------------------------------

    def trouble(self) -> Trouble | None:
        """Why the local ranks must be ended now, None while all is well."""
        peer_timeout_s = self.peer_timeout_s or self.timeout_s
        now = time.monotonic()
        with self._lock:
            for rank, (when, step) in sorted(self._beats.items()):
                if 0 < self.timeout_s < now - when:
                    return Trouble(
                        f"rank {rank} made no progress for {now - when:.0f} s after step {step} "
                        f"(fault.hang_timeout_s={self.timeout_s:g})",
                        peer_lost=False,
                    )
            for node, when in sorted(self._answered.items()):
                if 0 < peer_timeout_s < now - when and node not in self._reported:
                    self._reported.add(node)
                    return Trouble(
                        f"the keeper of {node} has not answered for {now - when:.1f} s (fault.peer_timeout_s="
                        f"{peer_timeout_s:g}): that node is dead or hung",
                        peer_lost=True,
                    )
        return None

    def _ping_loop(self) -> None:
        """A peer answers when its keeper greets a new connection: a hung one's kernel still accepts it."""
        while not self._stop.wait(PING_S):
            with self._lock:
                peers = dict(self._peers)
            for node, address in peers.items():
                if unreachable(address, timeout=2 * PING_S) is None:
                    with self._lock:
                        if node in self._answered:
                            self._answered[node] = time.monotonic()
                        self._reported.discard(node)
