"""Save and resharding-load time of the universal checkpoint against torch.distributed.checkpoint
and the raw disk, in one run, on CPU ranks over gloo.

State: N 2-D fp32 tensors (~1.2 GB in all) FSDP-sharded on dp_shard=4 (Shard(0)). Load target: a
2x2 mesh, the tensor set split in two halves like pipeline stages, each tensor Shard(1) over tp.
Both systems save the same DTensors and load into the same targets, each writing into them in place.

    python benchmarks/checkpoint_io.py [--dir /tmp/resurgo-bench] [--gb 1.2] [--repeats 2]

The page cache cannot be dropped without disturbing the whole machine (and needs root), so loads
read what the preceding saves left in memory, for every system alike, and the raw read baseline is
`dd` reading its own just-written file back. Rounds interleave dd, resurgo and DCP so each meets
the same disk conditions; each figure is the best of --repeats rounds.

Before each timed save, that writer's output of the previous round is deleted (untimed), so every
writer, dd included, writes into page cache the kernel recycles. On virtual machines whose never-
touched memory faults in slowly, a write into fresh page cache runs at the hypervisor's pace (here
about 150 MB/s, whoever writes), which would measure the machine's memory rather than the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLS = 3072
ROWS = 4096  # one tensor: 48 MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/resurgo-bench", help="scratch folder on the disk to measure")
    parser.add_argument("--gb", type=float, default=1.2, help="total state size in GB")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many rounds per measurement")
    parser.add_argument("--io-threads", type=int, default=4)
    parser.add_argument("--chunk-mib", type=float, default=4.0, help="resurgo's largest chunk")
    args = parser.parse_args()
    if args.ranks != 4:
        raise SystemExit("--ranks must be 4: the load target is a 2x2 mesh")
    scratch = Path(args.dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    n_tensors = max(2, round(args.gb * 1e9 / (ROWS * COLS * 4) / 2) * 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank_main, args=(args, n_tensors, port, results), nprocs=args.ranks, start_method="spawn")
    report = results.get()
    shutil.rmtree(scratch, ignore_errors=True)
    _print(report)


def _rank_main(rank: int, args: argparse.Namespace, n_tensors: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    dp = init_device_mesh("cpu", (4,), mesh_dim_names=("dp_shard",))
    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    state = _source_state(dp, n_tensors, rank)
    scratch = Path(args.dir)
    nbytes = n_tensors * ROWS * COLS * 4
    report: dict = {"tensors": n_tensors, "bytes": nbytes, "chunk_mib": args.chunk_mib, "io_threads": args.io_threads}

    opts = {"io_threads": args.io_threads, "max_chunk_bytes": int(args.chunk_mib * (1 << 20))}
    resurgo = _resurgo(scratch / "resurgo", state, **opts)
    zstd = _resurgo(scratch / "resurgo-zstd", state, **opts, compression="zstd:1")
    saves = {  # (timed save of round i, what it wrote)
        "dd_write": (lambda i: rank == 0 and _dd_write(scratch / "dd.bin", nbytes), lambda i: scratch / "dd.bin"),
        "resurgo_save": (lambda i: resurgo.save(i), lambda i: resurgo.root / f"step-{i:08d}"),
        "dcp_save": (
            lambda i: _dcp_save(scratch / f"dcp-{i}", state, threads=args.io_threads),
            lambda i: scratch / f"dcp-{i}",
        ),
        "resurgo_zstd_save": (lambda i: zstd.save(i), lambda i: zstd.root / f"step-{i:08d}"),
    }
    # Rounds interleave the systems so each meets the same (shared, noisy) disk conditions.
    for i in range(args.repeats):
        for key, (save, output) in saves.items():
            if i > 0:
                _remove(output(i - 1), rank)
            report[key] = min(report.get(key, float("inf")), _timed(lambda: save(i)))

    ours_targets = _target_state(grid, n_tensors, rank)
    dcp_targets = _target_state(grid, n_tensors, rank)
    loader = _resurgo(scratch / "resurgo", ours_targets, **opts)
    last = args.repeats - 1
    loads = {
        "dd_read": lambda: rank == 0 and _dd_read(scratch / "dd.bin"),
        "resurgo_load": lambda: loader.load(scratch / "resurgo" / f"step-{last:08d}"),
        "dcp_load": lambda: _dcp_load(scratch / f"dcp-{last}", dcp_targets),
    }
    for _ in range(args.repeats):
        for key, fn in loads.items():
            report[key] = min(report.get(key, float("inf")), _timed(fn))
    same = all(torch.equal(ours_targets[k].to_local(), dcp_targets[k].to_local()) for k in ours_targets)
    report["loaded_equal"] = _all_ranks(same)
    report["target_bytes"] = int(_sum_ranks(sum(t.to_local().nbytes for t in ours_targets.values())))
    if rank == 0:
        report["disk_resurgo"] = _du(scratch / "resurgo" / f"step-{last:08d}")
        report["disk_resurgo_zstd"] = _du(scratch / "resurgo-zstd" / f"step-{last:08d}")
        report["disk_dcp"] = _du(scratch / f"dcp-{last}")
        results.put(report)
    dist.barrier()
    dist.destroy_process_group()


class _InPlace:
    """A Stateful whose load copies into the live tensors, as a model's load_state_dict does."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        for name, tensor in self.tensors.items():
            tensor.to_local().copy_(state_dict[name].to_local())


def _resurgo(
    root: Path, state: dict[str, torch.Tensor], *, io_threads: int, max_chunk_bytes: int, compression: str = "none"
):
    from resurgo.checkpoint.store.checkpointer import Checkpointer
    from resurgo.trainer.config import CheckpointConfig

    cfg = CheckpointConfig(keep=10, compression=compression)
    return Checkpointer(
        cfg, root=root, states={"t": _InPlace(state)}, io_threads=io_threads, max_chunk_bytes=max_chunk_bytes
    )


def _dcp_save(path: Path, state: dict[str, torch.Tensor], *, threads: int) -> None:
    """With as many writer threads per rank as resurgo's (DCP's default is one); its reader has no such option."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(str(path), thread_count=threads)
    dcp.save({f"t/{k}": v for k, v in state.items()}, storage_writer=writer)


def _dcp_load(path: Path, targets: dict[str, torch.Tensor]) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load({f"t/{k}": v for k, v in targets.items()}, checkpoint_id=str(path))


def _source_state(mesh, n: int, rank: int) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor, Shard

    rows = ROWS // 4
    gen = torch.Generator().manual_seed(rank)
    return {
        f"{i:02d}": DTensor.from_local(
            torch.randn(rows, COLS, generator=gen),
            mesh,
            [Shard(0)],
            run_check=False,
            shape=(ROWS, COLS),
            stride=(COLS, 1),
        )
        for i in range(n)
    }


def _target_state(grid, n: int, rank: int) -> dict[str, torch.Tensor]:
    """Half of the tensors per pipeline-like stage; within a stage, Shard(1) over tp."""
    from torch.distributed.tensor import DTensor, Shard

    stage = grid.get_coordinate()[0]
    tp = grid["tp"]
    return {
        f"{i:02d}": DTensor.from_local(
            torch.zeros(ROWS, COLS // 2), tp, [Shard(1)], run_check=False, shape=(ROWS, COLS), stride=(COLS, 1)
        )
        for i in range(n)
        if i * 2 // n == stage
    }


def _all_ranks(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _sum_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def _remove(path: Path, rank: int) -> None:
    """Delete a previous round's output (untimed), so the next write recycles its page cache."""
    if rank == 0:
        path.unlink(missing_ok=True) if path.suffix == ".bin" else shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def _du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def _timed(fn) -> float:
    """Seconds from a barrier before `fn` on every rank to a barrier after it."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


_DD_BLOCK = 64 << 20


def _dd_write(path: Path, nbytes: int) -> None:
    path.unlink(missing_ok=True)
    count = max(1, -(-nbytes // _DD_BLOCK))
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", f"bs={_DD_BLOCK}", f"count={count}", "conv=fsync"],
        capture_output=True,
        check=True,
    )


def _dd_read(path: Path) -> None:
    subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={_DD_BLOCK}"], capture_output=True, check=True)


def _print(r: dict) -> None:
    gb = r["bytes"] / 1e9
    tgt = r["target_bytes"]

    def bw(nbytes: float, seconds: float) -> str:
        return f"{nbytes / 1e9 / seconds:.2f} GB/s"

    print(
        f"resurgo: chunks <= {r['chunk_mib']:g} MiB, {r['io_threads']} I/O threads per rank; dcp: {r['io_threads']} writer threads per rank"
    )
    print(
        f"state: {r['tensors']} fp32 tensors of {ROWS}x{COLS}, {gb:.2f} GB; save on dp_shard=4, load on 2 (stage split) x tp=2 Shard(1)"
    )
    print(
        f"raw disk (dd, {gb:.2f} GB):   write+fsync {r['dd_write']:.2f} s ({bw(r['bytes'], r['dd_write'])})   read back {r['dd_read']:.2f} s ({bw(r['bytes'], r['dd_read'])})"
    )
    print(f"save  resurgo      {r['resurgo_save']:.2f} s ({bw(r['bytes'], r['resurgo_save'])})")
    print(f"save  dcp          {r['dcp_save']:.2f} s ({bw(r['bytes'], r['dcp_save'])})")
    print(f"save  resurgo zstd {r['resurgo_zstd_save']:.2f} s ({bw(r['bytes'], r['resurgo_zstd_save'])})")
    print(f"load+reshard resurgo {r['resurgo_load']:.2f} s ({bw(tgt, r['resurgo_load'])} into targets)")
    print(f"load+reshard dcp     {r['dcp_load']:.2f} s ({bw(tgt, r['dcp_load'])} into targets)")
    print(f"loaded tensors identical between resurgo and dcp: {r['loaded_equal']}")
    print(
        f"bytes on disk: resurgo {r['disk_resurgo'] / 1e9:.3f} GB, resurgo zstd {r['disk_resurgo_zstd'] / 1e9:.3f} GB, dcp {r['disk_dcp'] / 1e9:.3f} GB"
    )
    save_ratio = r["resurgo_save"] / r["dcp_save"]
    load_ratio = r["resurgo_load"] / r["dcp_load"]
    save_frac = r["dd_write"] / r["resurgo_save"]
    load_frac = r["dd_read"] / r["resurgo_load"]
    print(f"ratio save  resurgo/dcp = {save_ratio:.2f}x (target <= 1.0)   {'ok' if save_ratio <= 1.0 else 'MISSED'}")
    print(f"ratio load  resurgo/dcp = {load_ratio:.2f}x (target <= 0.7)   {'ok' if load_ratio <= 0.7 else 'MISSED'}")
    print(
        f"save bandwidth = {save_frac:.0%} of raw disk write (target >= 60%)   {'ok' if save_frac >= 0.6 else 'MISSED'}"
    )
    print(
        f"load bandwidth = {load_frac:.0%} of raw read back (target >= 60%)   {'ok' if load_frac >= 0.6 else 'MISSED'}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
