"""Optimizer-state offloading: the CPU AdamW implementations on the same tensors, then the training
step with offload off, `cpu` and `auto`.

Part 1 times torch's fused and foreach AdamW and DeepSpeedCPUAdam (when installed) on the same
parameters and prints resurgo's default (`cpu_impl=auto`) against the fastest. Part 2 builds the
trainer in this process for each mode, alternating rounds so machine noise hits all alike, and prints
the median step time and the optimizer's bytes by where they live (offloaded: moments, fp32 master
and the host gradient buffer, 16 bytes per parameter; AdamW: its two moments, 8).

    python benchmarks/offload.py [--tiny] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from resurgo.trainer.config import load_config
from resurgo.trainer.distributed import init_distributed
from resurgo.trainer.offload import OffloadedAdamW
from resurgo.trainer.offload_kernels import cpu_updates, deepspeed_available, fixed, foreach_update, torch_update
from resurgo.trainer.offload_model import update_rate
from resurgo.trainer.trainer import Trainer

SIZES = {  # (elements updated in part 1, model of part 2)
    "default": (50_000_000, {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "max_seq_len": 256}),
    "tiny": (1_000_000, {}),
}
MODES = {
    "off": ["none"],
    "cpu": ["cpu"],
    "auto": ["auto"],
}


def update_rates(numel: int) -> None:
    impls = {"torch fused": fixed(torch_update), "torch foreach": fixed(foreach_update())}
    if deepspeed_available():
        impls["DeepSpeedCPUAdam"] = fixed(cpu_updates("deepspeed")["deepspeed"])
    cpu = torch.device("cpu")
    rates = {name: update_rate(update, numel=numel, device=cpu) for name, update in impls.items()}
    print(f"CPU AdamW update, {numel / 1e6:.1f}M fp32 parameters in 8 tensors ({torch.get_num_threads()} threads)")
    for name, rate in rates.items():
        print(f"  {name:18s} {numel / rate * 1e3:9.2f} ms/step  {rate / 1e6:8.1f} M params/s")
    if not deepspeed_available():
        print("  DeepSpeedCPUAdam   not installed (pip install deepspeed): not measured")
    default = max((n for n in rates if n != "torch foreach"), key=rates.get)  # what cpu_impl=auto picks
    fastest = max(rates, key=rates.get)
    print(
        f"  resurgo default ({default}) / fastest ({fastest}): {rates[default] / rates[fastest]:.2f}  (target >= 0.9)"
    )


def state_bytes(trainer: Trainer) -> tuple[int, int]:
    """Optimizer state (with any master copy and host gradient buffer) in host and device memory."""
    host = device = 0
    for opt in trainer.optimizers:
        if isinstance(opt, OffloadedAdamW):
            host += sum(4 * 4 * sg.numel for sg in opt.subgroups)
            continue
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    local = value.to_local() if hasattr(value, "to_local") else value
                    n = local.numel() * local.element_size()
                    host, device = (host + n, device) if local.device.type == "cpu" else (host, device + n)
    return host, device


def snapshot_copy_s(trainer: Trainer, repeats: int = 5) -> tuple[float, int]:
    """Seconds to copy the offloaded master weights and moments into a shared-memory buffer, as the lazy
    snapshot copies them into its keeper each step (median of `repeats`), and the bytes copied."""
    sources = [
        t
        for o in trainer.optimizers
        if isinstance(o, OffloadedAdamW)
        for sg in o.subgroups
        for t in (sg.master, sg.exp_avg, sg.exp_avg_sq)
    ]
    total = sum(t.numel() for t in sources)
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.NamedTemporaryFile(dir=shm) as f:
        target = torch.from_file(f.name, shared=True, size=total, dtype=torch.float32)
        times = []
        for _ in range(repeats):
            start, offset = time.perf_counter(), 0
            for t in sources:
                target[offset : offset + t.numel()].copy_(t)
                offset += t.numel()
            times.append(time.perf_counter() - start)
    return statistics.median(times), 4 * total


def step_times(model: dict, steps: int, device: str) -> None:
    env = init_distributed(device)
    train = {"batch_size": 8, "seq_len": 64, "log_every": 0, "device": device, "precision": "fp32", "steps": 10**6}
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (mode,) in MODES.items():
            cfg = load_config({"model": model, "train": train, "optim": {"offload": {"mode": mode, "subgroup_mb": 4}}})
            trainers[name] = Trainer(cfg, env=env, run_dir=Path(tmp) / name)
            for _ in range(2):  # warm-up, and the optimizer state exists
                trainers[name].train_step()
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(3):
            for name, trainer in trainers.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    trainer.train_step()
                    times[name].append(time.perf_counter() - start)
        print(f"training step, model {model or 'tiny'} on {device}, median of {3 * steps} steps")
        base = statistics.median(times["off"])
        for name, trainer in trainers.items():
            host, dev = state_bytes(trainer)
            median = statistics.median(times[name])
            split = "".join(
                f" device subgroups {o.plan.device_count}/{len(o.subgroups)}"
                for o in trainer.optimizers
                if isinstance(o, OffloadedAdamW)
            )
            print(
                f"  offload {name:4s} {median * 1e3:8.2f} ms/step  x{base / median:5.2f} vs off  "
                f"optimizer host {host / 2**20:7.2f} MiB device {dev / 2**20:7.2f} MiB {split}"
            )
        copy_s, nbytes = snapshot_copy_s(trainers["cpu"])
        print(
            f"  snapshot copy of the offloaded state ({nbytes / 2**20:.1f} MiB) into shared memory: {copy_s * 1e3:.2f} ms "
            f"= {copy_s / statistics.median(times['cpu']):.1%} of an offloaded step (lazy: beside the next forward/backward)"
        )
        if device == "cpu":
            print(
                "  (no GPU here: the 'device' is the CPU, so device memory is host memory and auto keeps all on the CPU)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes, for a quick check")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    numel, model = SIZES["tiny" if args.tiny else "default"]
    update_rates(numel)
    step_times(model, args.steps, "cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    main()
