"""How a run is protected and how it comes back: the hooks the trainer runs, and resume at start.

`Protection` wires the levels for one worker (the trainer builds it, handing over its states by
name): memory snapshots every step held by the node's
keeper (which also persists every `checkpoint.every`-th one), or, with `fault.keeper=off`, plain
synchronous saves. `Protection.resume` (collective) restores the newest step every rank can rebuild
from the cheapest place: the keeper's memory (same topology, plain copies, no disk), else the newest
committed checkpoint on disk, else nothing (a fresh start); it logs which, in one line on rank 0.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import CheckpointConfig, FaultConfig
from ..erasure.coding import ErasureSetup
from ..errors import CheckpointError, NothingToResume, SaveFailed
from ..keeper import messages as m
from ..keeper.client import EXTERNAL, OFF, HeldSlots, KeeperLink
from ..keeper.protocol import Client, KeeperError, KeeperGone, StoreTarget, ask
from ..process import incarnation, launcher_pid, supervisor_pid
from ..snapshot.capture import StateCapture
from ..snapshot.engine import Registration, SnapshotEngine
from ..store import commit as commits
from ..store.checkpointer import Checkpointer, Stateful
from ..store.hf_io import hf_folder, load_hf, model_record
from ..store.safetensors_io import load_safetensors
from .checkfree import StageNeighbours, StageRebuild
from .keeper_memory import KeeperMemory
from .peers import PeersMemory, agree_plan
from .sources import RecoverySource, Resumed, first_restored
from .store_checkpoints import StoreCheckpoints

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 120.0  # a keeper starting on a busy node
COMMIT_WAIT_S = 600.0  # longest the end of a run waits for its final checkpoint's commit
COMMIT_POLL_S = 0.2
BEAT_TIMEOUT_S = 10.0  # a keeper that takes longer to note a step is itself stuck: beat again next step


class Protection:
    """Hooks for the trainer (`hooks`), per-step numbers (`metrics()`), `resume()` at start, `close()` at the end."""

    def __init__(
        self,
        checkpoint: CheckpointConfig,
        fault: FaultConfig,
        *,
        states: Mapping[str, Stateful],
        run_dir: Path,
        rank: int,
        local_rank: int,
        local_world_size: int,
        device: torch.device,
        topology: Mapping[str, Any],
        warmed: HeldSlots | None = None,
        stages: StageRebuild | None = None,
        ran_before: bool = False,
    ) -> None:
        """Collective: every rank builds it before `resume`; `warmed` is this node's memory mapped
        ahead for a restore from peers (`recovery.peers.prefetch_ahead`); `stages`, where the trainer
        can rebuild lost pipeline stages from their neighbours (CheckFree, `fault.checkfree`);
        `ran_before`, that the keepers hold an earlier incarnation of this run (`previous_topology`)."""
        ck = self.checkpoint = checkpoint
        self.fault = fault
        self.states, self.rank = dict(states), rank
        self.root = Path(ck.dir) if ck.dir else run_dir / "checkpoints"
        self.run_dir = run_dir
        self.checkpointer = Checkpointer(ck, root=self.root, states=self.states, topology=topology)
        self.comm = self.checkpointer.comm
        self.token = self.comm.all_gather(secrets.token_hex(4))[0]  # names this incarnation's persists
        # Collective: a replacement node starts at restart count 0, and so may every node of a world
        # (replacements, and nodes whose workers torchrun restarted only because nodes joined, which
        # it does not count): the keepers' memory of the run says it ran before.
        self.restarted = any(self.comm.all_gather(ran_before or incarnation() != (0, 0)))
        self.link: KeeperLink | None = None
        self.engine: SnapshotEngine | None = None
        self.plan: ErasureSetup | None = None
        self.secret = ""  # set when the keepers code across nodes or may hold an earlier incarnation's memory
        self.local_rank, self.topology = local_rank, dict(topology)
        self.warmed = warmed  # closed once resumed, whatever the source
        self.stages = stages if fault.checkfree != "off" else None
        self.hooks: list[Any] = []
        if fault.keeper == OFF or not (ck.snapshot_every or ck.every):
            if ck.every:
                self.hooks.append(SyncSave(self.checkpointer))
            return
        self.link = KeeperLink(
            run_dir=run_dir,
            mode=fault.keeper,
            local_rank=local_rank,
            keeper_args=["--auto", "--idle-timeout", str(fault.keeper_lease_s)],
        )
        # auto: local rank 0 starts a keeper if none runs (it answers within a second, long before
        # it has loaded the store code); external: the launch script promised one.
        if not self.link.connect(wait_s=CONNECT_WAIT_S):
            if fault.keeper == EXTERNAL:
                raise ValueError(
                    f"fault.keeper=external but no keeper answers at {self.link.path}: start "
                    f"`resurgo-keeper --run-dir {run_dir}` on every node before the workers, or use fault.keeper=auto"
                )
            log.warning(
                "no keeper answered within %.0f s; training goes on, snapshots start when one does", CONNECT_WAIT_S
            )
        store = None
        if ck.every:
            store = StoreTarget(
                str(self.root.absolute()), ck.keep, ck.compression, dict(topology), self.comm.world_size, self.token
            )
        registration = Registration(
            rank=rank,
            local_world_size=local_world_size,
            world_size=self.comm.world_size,
            token=self.token,
            store=store,
            host_memory_bytes=int(ck.host_memory_gb * 2**30),
            launcher=launcher_pid(),
            lease_s=fault.keeper_lease_s,
            hang_timeout_s=fault.hang_timeout_s,
            peer_timeout_s=fault.peer_timeout_s,
            supervisor=supervisor_pid(),
        )
        self.capture = StateCapture(self.states, rank=rank)
        # The state's layout, and with it the optimizer's state (created by a zero step), exist from the
        # start: a resume then only fills them, and the first snapshot finds them ready.
        self.capture.current_layout()
        self.engine = SnapshotEngine(
            capture=self.capture,
            link=self.link,
            registration=registration,
            every=ck.snapshot_every,
            persist_every=ck.every,
            device=device,
        )
        self.hooks.append(self.engine)
        if fault.hang_timeout_s:
            self.hooks.append(ProgressBeat(self.link.path, rank=rank))
        erasure = fault.erasure
        if erasure.parity > 0:
            self.plan, self.secret = agree_plan(
                comm=self.comm,
                keeper=self._ask,
                local_rank=local_rank,
                token=self.token,
                data=erasure.data,
                parity=erasure.parity,
                topology=self.topology,
                degrade=self.restarted,
                every=erasure.every,
                max_mb_s=erasure.max_mb_s,
                encode=erasure.encode,
                device=device,
            )

    def metrics(self) -> dict[str, float]:
        return self.engine.stats.metrics() if self.engine is not None else {}

    # ---- resume -------------------------------------------------------------------------------

    def resume(self) -> Resumed:
        """Restore the newest step every rank can rebuild (collective); logs the source on rank 0."""
        self.comm.all_gather(None)  # the logged time is the restore's, not the wait for the slowest rank's start-up
        start = time.perf_counter()
        spec = self.checkpoint.resume
        # After a restart the run's own progress is newer than whatever checkpoint.resume names.
        restarted = self.restarted
        found, label = None, ""
        peers = self._peers_memory()
        ladder: list[RecoverySource] = []
        if restarted or spec == "latest":
            ladder = self._sources(peers)
            if (walked := first_restored(ladder)) is not None:
                found, label = walked[0], walked[1].label
        if self.warmed is not None:  # not read: memory of this node's own ranks served, or no peers' path
            self.warmed.close()
            self.warmed = None
        if found is None and spec not in ("none", "latest"):
            found, label = Resumed("disk", self.checkpointer.load(Path(spec)), spec), StoreCheckpoints.label
        refused = next((s.refused for s in ladder if getattr(s, "refused", "")), "") if ladder else ""
        if found is None and refused:
            raise NothingToResume(
                f"{refused}; nothing else holds their state (no committed checkpoint under {self.root}): refusing "
                "to start fresh. Restart with checkpoint.resume=none to start over deliberately (set "
                "checkpoint.every or fault.erasure to keep a copy)"
            )
        if found is None and peers is not None and peers.loss:
            raise NothingToResume(
                f"the nodes left cannot rebuild the run's state from memory ({peers.loss}) and no committed "
                f"checkpoint is under {self.root}: refusing to start fresh. Bring back the lost nodes, or restart "
                "with checkpoint.resume=none to start over deliberately (set checkpoint.every to protect on disk too)"
            )
        if found is None and self.checkpoint.init_from:
            found, label = self._init_from(self.checkpoint.init_from), "initial weights, fresh optimizer"
        if found is None:
            why = "nothing in memory or on disk" if restarted or spec == "latest" else "checkpoint.resume=none"
            found, label = Resumed("fresh", 0, why), "fresh start"
        if self.engine is not None:
            self.capture.invalidate()
            self.engine.registration = replace(self.engine.registration, resumed_from=found.step)
            self.engine.stats.copied = found.step if found.source == KeeperMemory.name else -1
        if self.rank == 0:
            log.info(
                "resume: %s at step %d (%s) in %.3f s", label, found.step, found.detail, time.perf_counter() - start
            )
        return found

    def _sources(self, peers: PeersMemory | None) -> list[RecoverySource]:
        """The ladder, cheapest first: this node's keeper, the peers' keepers, the store; rebuilding
        lost pipeline stages from their neighbours comes last (`fault.checkfree=fallback`: only when
        nothing holds a copy), or right after the keeper (`always`: a lost stage is never read back)."""
        ladder: list[RecoverySource] = []
        memory = None
        if self.link is not None:
            memory = KeeperMemory(
                comm=self.comm, rank=self.rank, keeper=self._ask, link=self.link, capture=self.capture
            )
            ladder.append(memory)
        if peers is not None:
            ladder.append(peers)

        def why_not_memory() -> str:
            loss = peers.loss if peers is not None else ""
            return f"memory cannot rebuild a step: {loss}" if loss else "no step held in memory by every rank"

        ladder.append(StoreCheckpoints(self.checkpointer, why_not_memory=why_not_memory))
        if memory is not None and self.stages is not None:
            rebuild = StageNeighbours(
                comm=self.comm, rank=self.rank, memory=memory, stages=self.stages, capture=self.capture
            )
            ladder.insert(1 if self.fault.checkfree == "always" else len(ladder), rebuild)
        return ladder

    def forget_memory(self) -> None:
        """Drop this rank's snapshots from its keeper, as if its machine's memory were lost (the
        stage failures `fault.simulate.mode=kill` makes real)."""
        if self.engine is not None:
            self.engine.fence()
        self._ask(m.Forget(self.rank))

    def _peers_memory(self) -> PeersMemory | None:
        """The peers' rung, where keepers code across nodes (or may hold an earlier incarnation's memory)."""
        if not self.secret:
            return None
        return PeersMemory(
            comm=self.comm,
            keeper=self._ask,
            local_rank=self.local_rank,
            token=self.token,
            secret=self.secret,
            capture=self.capture,
            topology=self.topology,
            held=self._take_held,
        )

    def _take_held(self) -> HeldSlots | None:
        """This node's memory for the peers' rung: as mapped ahead while the model was built, else now."""
        held, self.warmed = self.warmed, None
        if held is None and self.link is not None and self.link.client is not None:
            held = HeldSlots(self.link)
        return held

    def _init_from(self, source: str) -> Resumed:
        """A fresh run whose weights come from safetensors files, resurgo's names or a Hugging Face
        Llama folder (`hf:PATH`); each rank reads only its slices."""
        model = self.states["model"]
        weights = model.state_dict()
        folder = hf_folder(source)
        if folder is None:
            load_safetensors(Path(source), weights)
        else:
            # The small JSON states (not the tensors') say which model runs, to check against config.json.
            small = {k: s.state_dict() for k, s in self.states.items() if k not in ("model", "optim")}
            load_hf(folder, weights, model=model_record(small))
        model.load_state_dict(weights)
        return Resumed("hf" if folder else "safetensors", 0, source)

    def _ask(self, request: m.Request, *, strict: bool = False) -> Any:
        """The keeper's typed reply; without `strict`, None when no keeper answers or it refuses (there
        is nothing to use), with it KeeperGone or KeeperError."""
        link = self.link
        if link is not None and link.client is None and not link.connect(wait_s=0.0):
            link = None
        if strict:
            if link is None:
                raise KeeperGone(f"no keeper answers at {self.link.path if self.link else 'this node'}")
            return link.call(request)
        return ask(link, request)

    # ---- end ----------------------------------------------------------------------------------

    def close(self, *, step: int, ok: bool = True) -> None:
        """End of run: snapshot and persist the final step (when persisting), wait until it is committed.

        After a failure (`ok=False`) nothing is finished: the keeper keeps the snapshots for the restart.
        """
        if self.engine is None or self.link is None:
            return
        engine = self.engine
        engine.fence()
        try:
            if ok and self.checkpoint.every and step > 0:
                if self.link.client is None:  # a lost keeper: the end of the run must still be persisted
                    self.link.connect(wait_s=CONNECT_WAIT_S)
                if engine.stats.copied != step:
                    engine.begin(step, persist=True)
                    engine.fence()
                elif not engine.persist_due(step):
                    self._ask(m.Persist(self.rank, step))
            if ok:
                engine.update_status(self._ask(m.Finish(self.rank)))
                if self.checkpoint.every and step > 0:
                    self._await_commit(step)
        finally:
            engine.close()
            if self.link is not None:
                self.link.close()

    def _await_commit(self, step: int) -> None:
        """The run ends with its final checkpoint committed (by whichever node's keeper commits), or
        with an error that says why not: a run whose end is not on disk must not exit 0."""
        assert self.engine is not None
        stats, deadline = self.engine.stats, time.monotonic() + COMMIT_WAIT_S
        while stats.committed < step and stats.failed < 0:
            if time.monotonic() > deadline:
                raise SaveFailed(
                    f"the final checkpoint (step {step}) was not committed under {self.root} within {COMMIT_WAIT_S:.0f} s "
                    f"(newest committed: step {stats.committed}): see the keeper's log in {self.run_dir}"
                )
            try:
                self.engine.update_status(self._ask(m.StatusRequest(self.rank), strict=True))
            except (KeeperGone, KeeperError) as e:
                # A keeper exits once its last local rank's finish is answered and its part is written:
                # the committing keeper (maybe another node's) may still be sealing the step.
                self._await_commit_on_disk(step, deadline=deadline, why=str(e))
                stats.committed = step
                break
            if stats.committed < step:
                time.sleep(COMMIT_POLL_S)
        self.engine.check_saved()

    def _await_commit_on_disk(self, step: int, *, deadline: float, why: str) -> None:
        while not any(done == step for done, _ in commits.committed(self.root)):
            if time.monotonic() > deadline:
                raise SaveFailed(
                    f"the keeper stopped ({why}) and the final checkpoint (step {step}) was not committed under "
                    f"{self.root} within {COMMIT_WAIT_S:.0f} s: see the keepers' logs in {self.run_dir}"
                )
            time.sleep(COMMIT_POLL_S)


class ProgressBeat:
    """Tells the keeper, on a connection of its own, each step this rank finished: a rank that stops
    telling is hung (watch.py). One small request per step, from the training thread."""

    def __init__(self, path: Path, *, rank: int) -> None:
        self.path, self.rank = path, rank
        self.client: Client | None = None

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self, step: int) -> None:
        try:
            if self.client is None:
                self.client = Client(self.path, timeout=BEAT_TIMEOUT_S)
            self.client.call(m.Progress(self.rank, step))
        except (KeeperGone, KeeperError):
            self.close()  # no keeper, no watch: the process-group timeout still bounds a hang

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class SyncSave:
    """Without a keeper: a blocking collective save every `checkpoint.every` steps."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self, step: int) -> None:
        try:
            self.checkpointer.maybe_save(step)
        except CheckpointError as e:
            raise SaveFailed(str(e)) from None
