"""How long training stalls when it checkpoints every step, per method, in one run.

One model and topology (the Llama-style trainer, FSDP2 over `--ranks` CPU processes with gloo) on
the same processes, the methods interleaved in rounds so that a busy machine slows all alike: none,
a synchronous torch.save of the gathered state, dcp.save, dcp.async_save (shared-memory stager,
staging in a thread, its own gloo group), and resurgo (a memory snapshot every step held by the
node's keeper; and the same with one snapshot per turn persisted to the universal store by the
keeper). Per method it prints the median time training is blocked per step (the slowest rank's),
the mean step time against none (each turn's drain of what is still in flight included, so that a
persist or an upload that outlasts the steps counts), and the host memory holding checkpoint copies
(measured: the growth of shared memory mapped by the workers and the keeper in the method's first
turn). Snapshots the keeper skipped would block nothing: with any, it refuses to report.

    python benchmarks/snapshot_stall.py --ranks 4
    python benchmarks/snapshot_stall.py --ranks 1 --device cuda --dim 768 --layers 12 --heads 12 --seq 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODES = ("none", "torch.save", "dcp.save", "dcp.async_save", "resurgo", "resurgo+persist")
FIRST_TURN_WARMUP = 2  # extra unmeasured steps in the first round: buffers, plans and caches are created then


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="each round runs every method in turn")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per method and round")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per method and round")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="global sequences per step")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--root", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per rank, bf16")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here, as JSON")
    return parser.parse_args()


def shared_memory_bytes(pid: int | str = "self") -> int:
    """Shared memory mapped by a process, each page divided among the processes mapping it (PSS),
    so summing over the workers and the keeper counts every page once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Shmem:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def node_shared_memory(folder: Path) -> int:
    """This benchmark's shared memory: every rank's (summed over ranks) plus the keeper's."""
    from resurgo.checkpoint.keeper.client import keeper_pid

    total = torch.tensor([float(shared_memory_bytes())])
    if dist.get_rank() == 0 and (pid := keeper_pid(folder / "run")) is not None:
        total += shared_memory_bytes(pid)
    dist.all_reduce(total)
    return int(total)


class Timed:
    """A StepHook that times what the method blocks; subclasses do the checkpointing."""

    def __init__(self) -> None:
        self.blocked: list[float] = []
        self.steps: list[float] = []
        self.drains: list[float] = []  # each turn's end: what was still in flight (a persist, an upload)
        self.shm: list[int] = []
        self._fence = 0.0

    def before_optimizer_step(self) -> None:
        start = time.perf_counter()
        self.fence()
        self._fence = time.perf_counter() - start

    def after_optimizer_step(self, step: int) -> None:
        start = time.perf_counter()
        self.save(step)
        self.blocked.append(self._fence + time.perf_counter() - start)
        self._fence = 0.0

    def fence(self) -> None:
        pass

    def save(self, step: int) -> None:
        pass

    def pause(self) -> None:
        """Another method's turn: finish what is in flight."""

    def close(self) -> None:
        self.pause()


class TorchSave(Timed):
    def __init__(self, trainer: Any, folder: Path) -> None:
        super().__init__()
        self.trainer, self.path = trainer, folder / "full.pt"

    def save(self, step: int) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, optim = self.trainer.parts.modules[0], self.trainer.optimizers[0]
        state = {
            "model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, optim, options=options),
        }
        if dist.get_rank() == 0:
            torch.save(state, self.path)
        dist.barrier()


class DcpSave(Timed):
    def __init__(self, trainer: Any, folder: Path) -> None:
        super().__init__()
        self.trainer, self.folder = trainer, folder

    def state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model, optim = self.trainer.parts.modules[0], self.trainer.optimizers[0]
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self.state(), checkpoint_id=str(self.folder / "dcp"))


class DcpAsyncSave(DcpSave):
    """torchtitan's pattern: stage into shared memory in a thread, upload in another; wait for the
    staging right before the next optimizer step, and for the previous upload before the next save."""

    def __init__(self, trainer: Any, folder: Path) -> None:
        super().__init__(trainer, folder)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        options = StagingOptions(
            use_pinned_memory=torch.cuda.is_available(),
            use_shared_memory=True,
            use_async_staging=True,
            use_non_blocking_copy=torch.cuda.is_available(),
        )
        self.stager = DefaultStager(options)
        self.group = dist.new_group(backend="gloo")  # never shares a group with training collectives
        self.pending: Any = None

    def fence(self) -> None:
        staging = getattr(self.pending, "staging_completion", None)
        if staging is not None:
            staging.result()

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        self.pause()
        self.pending = dcp.async_save(
            self.state(),
            checkpoint_id=str(self.folder / "dcp_async"),
            process_group=self.group,
            async_stager=self.stager,
        )

    def pause(self) -> None:
        if self.pending is not None:
            getattr(self.pending, "upload_completion", self.pending).result()
            self.pending = None

    def close(self) -> None:
        self.pause()
        self.stager.close()


class ResurgoRun:
    """One protection (engine, keeper) shared by the two resurgo rows; times the background copies."""

    def __init__(self, trainer: Any, folder: Path) -> None:
        from dataclasses import replace

        from resurgo.checkpoint.state import checksum

        ck = replace(
            trainer.cfg.checkpoint, dir=str(folder / "resurgo"), every=10**9, snapshot_every=1
        )  # persists asked below
        self.trainer, self.protection = trainer, trainer.build_protection(checkpoint=ck)
        self.engine, self.copies, self.sums, self.closed = self.protection.engine, [], [], False
        copy, sums = self.engine.copier.copy, checksum.checksums

        def timed_copy(*args: Any, **kwargs: Any) -> None:  # in the snapshot thread, overlapping forward/backward
            start = time.perf_counter()
            copy(*args, **kwargs)
            self.copies.append(time.perf_counter() - start)

        def timed_checksums(*args: Any, **kwargs: Any) -> list[int]:  # right after the copy, in the same thread
            start = time.perf_counter()
            found = sums(*args, **kwargs)
            self.sums.append(time.perf_counter() - start)
            return found

        self.engine.copier.copy = timed_copy
        checksum.checksums = timed_checksums

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.protection.close(step=self.trainer.progress.step)


class Resurgo(Timed):
    """Snapshots every step; with `persist`, the first measured one of each turn is also persisted by
    the keeper, and the turn ends only once it is committed, so its cost lands in this row's steps."""

    def __init__(self, run: ResurgoRun, *, persist: bool) -> None:
        super().__init__()
        self.run, self.persist, self.warmup, self.turn_steps = run, persist, 0, 0

    def fence(self) -> None:
        self.run.engine.fence()

    def save(self, step: int) -> None:
        self.run.engine.begin(step, persist=self.persist and self.turn_steps == self.warmup)
        self.turn_steps += 1

    def pause(self) -> None:
        self.run.engine.fence()
        self.turn_steps = 0
        from resurgo.checkpoint.keeper.messages import StatusRequest

        while self.run.engine.link.call(StatusRequest()).backlog:
            time.sleep(0.05)

    def close(self) -> None:
        self.run.close()


def worker(rank: int, args: argparse.Namespace, port: int, folder: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(args.ranks),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(args.ranks),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from omegaconf import OmegaConf

    from resurgo.trainer.config import load_config
    from resurgo.trainer.distributed import init_distributed, shutdown
    from resurgo.trainer.trainer import Trainer

    cfg = load_config(
        OmegaConf.create(
            {
                "model": {
                    "dim": args.dim,
                    "n_layers": args.layers,
                    "n_heads": args.heads,
                    "n_kv_heads": args.heads // 2,
                    "max_seq_len": max(args.seq, 16),
                },
                "train": {
                    "device": args.device,
                    "steps": 10_000,
                    "seq_len": args.seq,
                    "batch_size": args.batch,
                    "log_every": 0,
                    "precision": "bf16" if args.device == "cuda" else "fp32",
                },
                "parallel": {"dp_shard": args.ranks},
                "fault": {"keeper": "auto"},
            }
        )
    )
    trainer = Trainer(cfg, env=init_distributed(args.device), run_dir=folder / "run")
    local = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.parts.parameters()]
    state_bytes = sum(t.nbytes for t in local) * 3  # parameters and two AdamW moments
    totals = torch.tensor([float(state_bytes)])
    dist.all_reduce(totals)
    shared: dict[str, Any] = {}
    hooks = {mode: make(mode, trainer, folder, shared) for mode in MODES}
    for round_ in range(args.rounds):
        for hook in hooks.values():
            trainer.hooks = [hook]
            base_shm = node_shared_memory(folder)
            warmup = args.warmup + (FIRST_TURN_WARMUP if round_ == 0 else 0)
            if isinstance(hook, Resurgo):
                hook.warmup = warmup  # persist the first measured step
            for i in range(warmup + args.steps):
                start = time.perf_counter()
                blocked = len(hook.blocked)
                trainer.train_step()
                if i >= warmup:
                    hook.steps.append(time.perf_counter() - start)
                else:
                    del hook.blocked[blocked:]
            if not hook.shm:  # what a method keeps, it allocates in its first turn
                hook.shm.append(max(node_shared_memory(folder) - base_shm, 0))
            start = time.perf_counter()
            hook.pause()
            hook.drains.append(time.perf_counter() - start)
            trainer.hooks = []
    rows = []
    skipped = torch.tensor([float(shared["run"].engine.stats.skipped)])
    dist.all_reduce(skipped, op=dist.ReduceOp.MAX)
    for mode, hook in hooks.items():
        copies = statistics.median(hook.run.copies) if isinstance(hook, Resurgo) else 0.0
        sums = statistics.median(hook.run.sums) if isinstance(hook, Resurgo) else 0.0
        # Step time: the mean over every measured step with each turn's drain, so that a persist or
        # an upload that outlasts the steps, and one costly step in a turn, both count.
        step = (sum(hook.steps) + sum(hook.drains)) / len(hook.steps)
        measured = torch.tensor([statistics.median(hook.blocked), step, copies, sums])
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
        rows.append((mode, float(measured[0]), float(measured[1]), hook.shm[0], float(measured[2]), float(measured[3])))
        hook.close()
    if rank == 0 and skipped.item():
        raise SystemExit(
            f"{int(skipped.item())} resurgo snapshot(s) were skipped (the keeper had no free slot): a skipped "
            "snapshot blocks nothing, so the resurgo rows would flatter it; not reporting"
        )
    if rank == 0:
        report(rows, args=args, state_bytes=float(totals[0]))
        if args.json:
            fields = ("method", "blocked_s", "step_s", "host_shm_bytes", "copy_s", "checksum_s")
            args.json.write_text(json.dumps([dict(zip(fields, row)) for row in rows], indent=1))
    trainer.close()
    shutdown()


def make(mode: str, trainer: Any, folder: Path, shared: dict[str, Any]) -> Timed:
    if mode.startswith("resurgo"):
        if "run" not in shared:
            shared["run"] = ResurgoRun(trainer, folder)
        return Resurgo(shared["run"], persist=mode.endswith("+persist"))
    return {
        "none": lambda: Timed(),
        "torch.save": lambda: TorchSave(trainer, folder),
        "dcp.save": lambda: DcpSave(trainer, folder),
        "dcp.async_save": lambda: DcpAsyncSave(trainer, folder),
    }[mode]()


def report(
    rows: list[tuple[str, float, float, int, float, float]], *, args: argparse.Namespace, state_bytes: float
) -> None:
    none = next(step for mode, _, step, _, _, _ in rows if mode == "none")
    print(
        f"{args.ranks} CPU ranks, FSDP2, {args.layers} layers x dim {args.dim}, {args.batch}x{args.seq} tokens per step; "
        f"checkpointed state {state_bytes / 2**20:.0f} MiB (parameters + AdamW moments, all ranks); every method checkpoints "
        f"every step; {args.rounds} rounds x {args.steps} measured steps per method (after {args.warmup} warm-up)"
    )
    print(
        f"{'method':<16}{'blocked/step (median)':>24}{'of step':>10}{'step (mean)':>12}{'vs none':>10}{'host shm':>12}"
    )
    shared = next(held for mode, _, _, held, _, _ in rows if mode == "resurgo")
    for mode, blocked, step, held, _, _ in rows:
        held = shared if mode.startswith("resurgo") else held  # one keeper serves both rows
        print(
            f"{mode:<16}{blocked * 1e3:>21.2f} ms{blocked / step:>10.2%}{step:>10.3f} s{step / none:>9.3f}x{held / 2**20:>8.0f} MiB"
        )
    blocked = {mode: b for mode, b, _, _, _, _ in rows}
    copy, sums = next((c, s) for mode, _, _, _, c, s in rows if mode == "resurgo")
    print(
        f"resurgo: a memory snapshot every step into the keeper; +persist: the keeper also writes one in every "
        f"{args.steps + args.warmup} to the universal store (one per turn, committed within it). The background copy takes "
        f"{copy * 1e3:.1f} ms per rank per step ({copy / none:.1%} of a step), then its checksums {sums * 1e3:.1f} ms "
        f"({sums / max(copy, 1e-9):.1%} of the copy, {sums / none:.1%} of a step); resurgo blocks "
        f"{blocked['dcp.async_save'] / max(blocked['resurgo'], 1e-9):.0f}x less than dcp.async_save"
    )


def main() -> None:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="snapshot_stall-", dir=args.root))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(worker, args=(args, port, folder), nprocs=args.ranks, join=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
