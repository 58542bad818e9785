"""`resurgo-ckpt`: look into, check, compare and export universal checkpoints.

    resurgo-ckpt inspect CKPT
    resurgo-ckpt verify CKPT                      # exit 1 and list every problem if damaged
    resurgo-ckpt export --to safetensors CKPT OUT [--dtype bf16] [--max-shard-size 5GB]
    resurgo-ckpt export --to hf CKPT OUT [--dtype bf16]        # a Hugging Face LlamaForCausalLM folder
    resurgo-ckpt export --to dcp CKPT OUT                      # torch.distributed.checkpoint, any topology
    resurgo-ckpt convert --from deepspeed|dcp SRC OUT [--name-map FILE]   # into a universal checkpoint
    resurgo-ckpt diff A B                         # max |a - b| per tensor
    resurgo-ckpt plan CKPT --layouts FILE         # chunks and bytes each target rank would read

CKPT may also be a checkpoint root: its newest committed checkpoint is used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from resurgo.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    Checkpoint,
    CheckpointError,
    convert_dcp,
    convert_deepspeed,
    describe,
    diff,
    export_dcp,
    export_hf,
    export_safetensors,
    latest,
    plan_for_layouts,
    verify,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _open(path: str) -> Checkpoint:
    p = Path(path)
    if not (p / "resurgo.json").exists() and not (p / "COMMITTED").exists():
        newest = latest(p)
        if newest is not None:
            p = newest
    return Checkpoint.open(p)


def _inspect(args: argparse.Namespace) -> int:
    print(describe(_open(args.checkpoint)))
    return 0


def _verify(args: argparse.Namespace) -> int:
    ckpt = _open(args.checkpoint)
    problems = verify(ckpt, threads=args.threads, progress=True)
    if problems:
        print(f"{ckpt.path}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    shards = sum(1 for a in ckpt.meta.arrays.values() for _ in a.shard_indices())
    chunks = sum(1 for a in ckpt.meta.arrays.values() for _ in a.chunk_indices())
    print(
        f"{ckpt.path}: ok (step {ckpt.meta.step}, {len(ckpt.meta.arrays)} tensors, {shards} shards, {chunks} chunks verified)"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    checkpoint, out = _open(args.checkpoint), Path(args.out)
    common = dict(dtype=args.dtype, progress=True, overwrite=args.overwrite)
    if args.to == "dcp":
        export_dcp(checkpoint, out, **common)
        print(f"wrote a torch.distributed.checkpoint to {out}")
        return 0
    export = export_hf if args.to == "hf" else export_safetensors
    files = export(checkpoint, out, max_shard_bytes=args.max_shard_size, **common)
    extra = "config.json and the index" if args.to == "hf" else "model.safetensors.index.json"
    print(f"wrote {len(files)} file(s), {extra} to {out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    convert = {"deepspeed": convert_deepspeed, "dcp": convert_dcp}[args.source_format]
    written = convert(
        Path(args.source),
        Path(args.out),
        name_map=Path(args.name_map) if args.name_map else None,
        progress=True,
        overwrite=args.overwrite,
    )
    print(f"wrote {written}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    rows = diff(_open(args.a), _open(args.b), progress=True)
    width = max((len(r.name) for r in rows), default=4)
    for r in rows:
        print(f"{r.name:<{width}}  {r.note if r.max_abs is None else f'{r.max_abs:.6g}'}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    plan = plan_for_layouts(_open(args.checkpoint), Path(args.layouts))
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
        return 0
    summary = plan.to_json()
    for rank in sorted(plan.reads):
        print(f"rank {rank}: {plan.bytes_read(rank)} bytes")
        for name, entry in sorted(summary[str(rank)].items()):
            print(f"  {name}: {len(entry['shards'])} shards, {entry['chunks']} chunks, {entry['bytes']} bytes")
    return 0


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 500MB or 5GB")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resurgo-ckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(required=True, dest="command")
    p = sub.add_parser("inspect", help="step, saving topology, tensors")
    p.add_argument("checkpoint")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("verify", help="every chunk present and its checksum valid")
    p.add_argument("checkpoint")
    p.add_argument("--threads", type=int, default=4)
    p.set_defaults(run=_verify)
    p = sub.add_parser("export", help="write the model tensors in another format")
    p.add_argument("--to", choices=["safetensors", "hf", "dcp"], required=True)
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--max-shard-size", type=_size, default=DEFAULT_MAX_SHARD_BYTES)
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUT (only once the new export is complete)"
    )
    p.set_defaults(run=_export)
    p = sub.add_parser("convert", help="bring another framework's checkpoint in as a universal checkpoint")
    p.add_argument("--from", dest="source_format", choices=["deepspeed", "dcp"], required=True)
    p.add_argument("source")
    p.add_argument("out", help="a checkpoint root; the converted step is written under it")
    p.add_argument("--name-map", help='JSON {"names": {regex: resurgo name}, "rotary": "halves"|"pairs"}')
    p.add_argument("--overwrite", action="store_true", help="replace that step if OUT already holds it")
    p.set_defaults(run=_convert)
    p = sub.add_parser("diff", help="max absolute difference per tensor")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(run=_diff)
    p = sub.add_parser("plan", help="what each target rank would read")
    p.add_argument("checkpoint")
    p.add_argument("--layouts", required=True, help='JSON list of {"layout": ..., "ranks": [...]}')
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_plan)
    return parser


if __name__ == "__main__":
    sys.exit(main())
