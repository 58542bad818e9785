"""Tokens/s of resurgo against a minimal hand-written PyTorch loop, then per topology.

Part 1 runs both in this process, alternating rounds so machine noise hits both alike, on the same
model, batch and optimizer, and prints resurgo / baseline. Part 2 launches each parallel topology
through torchrun (the real launch path) and prints the median tokens/s it logged.

    python benchmarks/throughput.py [--steps 30] [--skip-topologies]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resurgo.trainer.config import load_config
from resurgo.trainer.data import GlobalSampler, load_tokens, make_tokenizer
from resurgo.trainer.distributed import init_distributed
from resurgo.trainer.model import Transformer
from resurgo.trainer.trainer import Trainer

MODEL = {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "max_seq_len": 256}
TRAIN = {"batch_size": 8, "seq_len": 256, "log_every": 0, "device": "cpu", "precision": "fp32"}
TOPOLOGIES = [
    (2, ["parallel.dp_shard=2"]),
    (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    (2, ["parallel.tp=2"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule=GPipe"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule=1F1B"]),
    (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    (4, ["parallel.pp=2", "parallel.tp=2"]),
    (4, ["parallel.pp=2", "parallel.dp_shard=2"]),
    (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    (8, ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2"]),
]


class BaselineLoop:
    """What a user would write by hand: model, AdamW, the same batches, clip, step (bf16: autocast)."""

    def __init__(self, cfg, *, device: torch.device = torch.device("cpu"), bf16: bool = False) -> None:
        with torch.device("meta"):
            self.model = Transformer(cfg.model)
        self.model.to_empty(device=device)
        self.model.init_weights(seed=cfg.train.seed)
        self.device, self.bf16 = device, bf16
        o = cfg.optim
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
            fused=True,
        )
        tokens = load_tokens(cfg.data, make_tokenizer(cfg.data.tokenizer))
        self.sampler = GlobalSampler(tokens, seq_len=cfg.train.seq_len, seed=cfg.data.seed)
        self.batch, self.clip = cfg.train.batch_size, cfg.optim.grad_clip

    def train_step(self) -> None:
        x, y = self.sampler.next_batch(global_batch=self.batch, dp_rank=0, dp=1)
        x, y = x.to(self.device), y.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()


def timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def single_process(steps: int) -> None:
    cfg = load_config({"model": MODEL, "train": {**TRAIN, "steps": 10**6}})
    env = init_distributed("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, env=env, run_dir=Path(tmp))
        baseline = BaselineLoop(cfg)
        timed(trainer.train_step, 3), timed(baseline.train_step, 3)  # warm-up
        ours, theirs = [], []
        for _ in range(3):  # alternate rounds so drift in machine speed hits both
            ours += timed(trainer.train_step, steps)
            theirs += timed(baseline.train_step, steps)
        trainer.close()
    tokens = cfg.train.batch_size * cfg.train.seq_len
    ours_tps, theirs_tps = tokens / statistics.median(ours), tokens / statistics.median(theirs)
    print(f"model {MODEL} batch {cfg.train.batch_size}x{cfg.train.seq_len}, AdamW fused, fp32, CPU, 1 process")
    print(f"baseline loop : {theirs_tps:10,.0f} tokens/s (median of {len(theirs)} steps)")
    print(f"resurgo       : {ours_tps:10,.0f} tokens/s (median of {len(ours)} steps)")
    print(f"ratio resurgo / baseline = {ours_tps / theirs_tps:.3f}  (target >= 0.95)")


def topologies(steps: int) -> None:
    overrides_base = [f"model.{k}={v}" for k, v in MODEL.items()] + [f"train.{k}={v}" for k, v in TRAIN.items()]
    overrides_base += [f"train.steps={steps}", "train.log_every=1"]
    print(f"\n{'topology':<40} {'procs':>5} {'tokens/s':>12}")
    for nproc, overrides in [(1, [])] + TOPOLOGIES:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={nproc}",
                "-m",
                "resurgo.launch.train",
                *overrides_base,
                *overrides,
                f"run.root={tmp}",
                "run.name=b",
            ]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, cwd=tmp, env={"OMP_NUM_THREADS": str(max(1, 2 // nproc)), **_env()}
            )
            name = " ".join(o.removeprefix("parallel.") for o in overrides) or "single process"
            if proc.returncode:
                print(f"{name:<40} {nproc:>5} {'failed':>12}\n{proc.stderr[-2000:]}")
                continue
            records = [json.loads(line) for line in open(Path(tmp) / "b" / "metrics.jsonl")]
            tps = statistics.median(r["tokens_per_s"] for r in records[3:])
            print(f"{name:<40} {nproc:>5} {tps:12,.0f}")


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-topologies", action="store_true")
    args = parser.parse_args()
    single_process(args.steps)
    if not args.skip_topologies:
        print(f"(this machine: {torch.get_num_threads()} threads; every topology shares them)")
        topologies(args.steps)


if __name__ == "__main__":
    main()
