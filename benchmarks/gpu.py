"""What only a GPU can show, in one run and one table (a few minutes on one H100 or H200):

1. training: the 125m model in bf16 on one GPU, resurgo's trainer against a hand-written loop
   (autocast bf16, fused AdamW, the same batches): tokens/s and MFU;
2. snapshots: `snapshot_stall.py` on that GPU: the time training is blocked per step by a memory
   snapshot every step (CUDA copier, keeper) against `dcp.async_save`, and the step time with it
   against none (so tokens/s with snapshots on);
3. copier: the snapshot's device-to-host copy (`CudaCopier`, a side stream) into page-locked memory,
   into a registered shared-memory segment (what the keeper's slots are), and into pageable memory:
   GB/s, every byte checked;
4. erasure: Reed-Solomon encode (k=4, m=2) with the Triton kernel on the device against the host
   path on the same bytes: GB/s, parity identical, and a decode of two lost buffers exact.

    python benchmarks/gpu.py           # on a GPU machine
    python benchmarks/gpu.py --tiny    # every part at a tiny size on CPU (the kernel under TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from throughput import BaselineLoop, timed

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    part: str
    measure: str
    resurgo: str
    baseline: str = ""
    ratio: str = ""


@dataclass(frozen=True)
class Size:
    model: dict
    batch: int
    seq: int
    steps: int
    copy_mib: int
    ec_bytes: int


FULL = Size(
    model={"dim": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 4, "ffn_hidden": 2048, "max_seq_len": 2048},
    batch=16,
    seq=1024,
    steps=20,
    copy_mib=1024,
    ec_bytes=256 * 2**20,
)
TINY = Size(
    model={"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "max_seq_len": 64},
    batch=2,
    seq=32,
    steps=2,
    copy_mib=4,
    ec_bytes=2**16,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def training(size: Size, device: torch.device) -> list[Row]:
    from resurgo.trainer.config import load_config
    from resurgo.trainer.distributed import init_distributed
    from resurgo.trainer.metrics import peak_flops
    from resurgo.trainer.trainer import Trainer

    bf16 = device.type == "cuda"
    cfg = load_config(
        {
            "model": size.model,
            "fault": {"keeper": "off"},
            "train": {
                "device": device.type,
                "precision": "bf16" if bf16 else "fp32",
                "steps": 10**6,
                "batch_size": size.batch,
                "seq_len": size.seq,
                "log_every": 0,
            },
        }
    )
    env = init_distributed(device.type)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, env=env, run_dir=Path(tmp))
        baseline = BaselineLoop(cfg, device=env.device, bf16=bf16)
        timed(trainer.train_step, 3), timed(baseline.train_step, 3)  # warm-up: allocator, kernels, caches
        ours, theirs = [], []
        for _ in range(3):  # alternating rounds: drift in the machine's speed hits both
            ours += timed(trainer.train_step, size.steps)
            theirs += timed(baseline.train_step, size.steps)
        flops_per_token = trainer.metrics.flops_per_token
        trainer.close()
        del trainer, baseline
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the snapshot part runs in another process on the same device
    tokens = size.batch * size.seq
    ours_tps, theirs_tps = tokens / statistics.median(ours), tokens / statistics.median(theirs)
    rows = [
        Row(
            "training",
            f"tokens/s ({size.batch}x{size.seq}, {'bf16' if bf16 else 'fp32'})",
            f"{ours_tps:,.0f}",
            f"{theirs_tps:,.0f}",
            f"{ours_tps / theirs_tps:.3f}",
        )
    ]
    peak = peak_flops(env.device)
    if peak:
        mfu = lambda tps: f"{tps * flops_per_token / peak:.1%}"  # noqa: E731
        rows.append(Row("training", "MFU (dense bf16 peak)", mfu(ours_tps), mfu(theirs_tps)))
    return rows


def snapshots(size: Size, device: torch.device) -> list[Row]:
    m = size.model
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [
            sys.executable,
            str(HERE / "snapshot_stall.py"),
            "--ranks",
            "1",
            "--device",
            device.type,
            "--dim",
            str(m["dim"]),
            "--layers",
            str(m["n_layers"]),
            "--heads",
            str(m["n_heads"]),
            "--batch",
            str(size.batch),
            "--seq",
            str(size.seq),
            "--rounds",
            "2" if device.type == "cuda" else "1",
            "--steps",
            "4" if device.type == "cuda" else "1",
            "--warmup",
            "1" if device.type == "cuda" else "0",
            "--root",
            tmp,
            "--json",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
        print(proc.stdout, end="")
        if proc.returncode:
            return [
                Row(
                    "snapshots",
                    "snapshot_stall.py failed",
                    proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "",
                )
            ]
        rows = {r["method"]: r for r in json.loads(out.read_text())}
    ours, dcp, none = rows["resurgo"], rows["dcp.async_save"], rows["none"]
    return [
        Row(
            "snapshots",
            "blocked per step (median), vs dcp.async_save",
            f"{ours['blocked_s'] * 1e3:.2f} ms",
            f"{dcp['blocked_s'] * 1e3:.2f} ms",
            f"{ours['blocked_s'] / max(dcp['blocked_s'], 1e-9):.3f}",
        ),
        Row(
            "snapshots",
            "tokens/s, a snapshot every step, vs none",
            f"{size.batch * size.seq / ours['step_s']:,.0f}",
            f"{size.batch * size.seq / none['step_s']:,.0f}",
            f"{none['step_s'] / ours['step_s']:.3f}",
        ),
        Row(
            "snapshots",
            "background copy + checksums per step",
            f"{ours['copy_s'] * 1e3:.1f} + {ours['checksum_s'] * 1e3:.1f} ms",
        ),
    ]


def copier(size: Size, device: torch.device) -> list[Row]:
    from resurgo.checkpoint.keeper import shm
    from resurgo.checkpoint.keeper.client import pin_for_dma, unpin_for_dma
    from resurgo.checkpoint.snapshot.engine import CudaCopier, HostCopier

    cuda = device.type == "cuda"
    numel = size.copy_mib * 2**20 // 2 // 16
    generator = torch.Generator(device=device).manual_seed(0)
    srcs = [torch.randn(numel, device=device, dtype=torch.bfloat16, generator=generator) for _ in range(16)]
    nbytes = sum(s.nbytes for s in srcs)
    segment = shm.Segment.create(f"{shm.PREFIX}gpucheck.{os.getpid()}", nbytes)
    pin_for_dma(segment)
    try:
        targets = {
            "page-locked": torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda),
            "registered shared memory": torch.from_numpy(segment.array()),
            "pageable": torch.empty(nbytes, dtype=torch.uint8),
        }
        engine = CudaCopier(device) if cuda else HostCopier()
        rates = {}
        for name, flat in targets.items():
            views = [flat[i * s.nbytes : (i + 1) * s.nbytes].view(torch.bfloat16) for i, s in enumerate(srcs)]
            flat.zero_()
            rates[name] = nbytes / best_of(lambda: engine.copy(views, srcs, engine.mark()), device) / 1e9
            if not all(torch.equal(v, s.cpu()) for v, s in zip(views, srcs)):
                raise SystemExit(f"the copier's copy into {name} memory differs from the device tensors")
    finally:
        unpin_for_dma(segment)
        segment.close()
        shm.unlink(segment.name)
    kind = "CudaCopier, side stream" if cuda else "HostCopier"
    return [
        Row(
            "copier",
            f"device to host GB/s ({kind}), vs pageable",
            f"{rates['page-locked']:.1f}",
            f"{rates['pageable']:.1f}",
            f"{rates['page-locked'] / rates['pageable']:.2f}",
        ),
        Row(
            "copier",
            "into a registered shared segment (keeper slot)",
            f"{rates['registered shared memory']:.1f}",
            "",
            "bytes exact",
        ),
    ]


def erasure_coding(size: Size, device: torch.device) -> list[Row]:
    from resurgo.checkpoint.erasure import code as erasure
    from resurgo.kernels import gf256
    from resurgo.kernels.erasure_triton import combine_triton

    k, m, n = 4, 2, size.ec_bytes
    host = [np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8) for i in range(k)]
    if device.type == "cuda":  # the real path: chunked, on the device's buffers
        on_device = [torch.from_numpy(b).to(device) for b in host]
        device_encode = lambda: erasure.encode(on_device, m=m).parity  # noqa: E731
    else:  # the kernel alone, under the interpreter
        stacked, out = torch.from_numpy(np.stack(host)), torch.empty((m, n), dtype=torch.uint8)
        device_encode = lambda: (combine_triton(gf256.cauchy_parity(k, m), stacked, out), list(out))[1]  # noqa: E731
    host_encode = lambda: erasure.encode(host, m=m).parity  # noqa: E731
    kernel_s, host_s = best_of(device_encode, device), best_of(host_encode, device)
    parity_device, parity_host = device_encode(), host_encode()
    identical = all(np.array_equal(d.cpu().numpy(), h) for d, h in zip(parity_device, parity_host))
    stripe = erasure.Stripe(k=k, m=m, lengths=(n,) * k)
    survivors = {2: host[2], 3: host[3], 4: parity_device[0].cpu().numpy(), 5: parity_device[1].cpu().numpy()}
    rebuilt = erasure.decode(survivors, stripe)
    exact = all(np.array_equal(np.asarray(rebuilt[i]), host[i]) for i in (0, 1))
    if not (identical and exact):
        raise SystemExit(f"erasure coding disagrees: parity identical {identical}, decode exact {exact}")
    kernel = "Triton on device" if device.type == "cuda" else "Triton interpreted"
    return [
        Row(
            "erasure",
            f"encode k={k} m={m} GB/s ({kernel} vs host)",
            f"{k * n / kernel_s / 1e9:.2f}",
            f"{k * n / host_s / 1e9:.2f}",
            f"{host_s / kernel_s:.2f}",
        ),
        Row("erasure", "parity identical, two lost buffers decoded", "yes"),
    ]


def print_table(rows: list[Row], device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}; torch {torch.__version__}")
    columns = ("part", "measure", "resurgo", "baseline", "ratio")
    widths = [max(len(c), *(len(getattr(r, c)) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(getattr(row, c).ljust(w) for c, w in zip(columns, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="every part at a tiny size on CPU, to check the script")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU; `--tiny` runs every part at a tiny size on CPU")
    device = torch.device("cuda", 0) if not args.tiny else torch.device("cpu")
    size = TINY if args.tiny else FULL
    rows: list[Row] = []
    for part in (erasure_coding, copier, training, snapshots):
        start = time.perf_counter()
        rows += part(size, device)
        print(f"{part.__name__}: {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows, device)


if __name__ == "__main__":
    main()
