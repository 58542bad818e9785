"""Erasure coding throughput: resurgo's CPU path against pyeclib (ISA-L), zfec and a plain memory copy.

Usage: python benchmarks/erasure.py [--mib 256] [--repeat 3]

Throughput is GB/s of data (the k data buffers). Decode rebuilds the worst case: m lost data buffers.
The libraries get their best use: input prepared as bytes outside the timing, fed in segments of
--segment-mib (whole 256 MiB calls are several times slower for pyeclib).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

from resurgo.checkpoint.erasure import CHUNK_BYTES, decode, encode
from resurgo.kernels import isal

SHAPES = [(4, 1), (4, 2), (8, 2), (8, 3)]
PYECLIB_TYPES = ["isa_l_rs_vand", "isa_l_rs_cauchy"]


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm: first touch of output pages, table setup
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def resurgo_rows(data: np.ndarray, *, k: int, m: int, repeat: int, backend: str) -> tuple[float, float]:
    views = np.split(data, k)
    parity = [np.empty(views[0].size, dtype=np.uint8) for _ in range(m)]
    group = encode(views, m=m, out=parity, backend=backend)
    enc = best_seconds(lambda: encode(views, m=m, out=parity, backend=backend), repeat)
    survivors = {i: b for i, b in enumerate([*views, *parity]) if i >= m}
    out = {i: np.empty(views[0].size, dtype=np.uint8) for i in range(m)}
    dec = best_seconds(lambda: decode(survivors, group.stripe, out=out, backend=backend), repeat)
    assert all(np.array_equal(out[i], views[i]) for i in range(m))
    return enc, dec


def segments(data: np.ndarray, segment: int) -> list[bytes]:
    return [data[o : o + segment].tobytes() for o in range(0, data.size, segment)]


def pyeclib_rows(chunks: list[bytes], *, k: int, m: int, repeat: int, ec_type: str) -> tuple[float, float]:
    from pyeclib.ec_iface import ECDriver

    driver = ECDriver(k=k, m=m, ec_type=ec_type)
    enc = best_seconds(lambda: [driver.encode(c) for c in chunks], repeat)
    fragments = [driver.encode(c)[m:] for c in chunks]
    lost = list(range(m))
    dec = best_seconds(lambda: [driver.reconstruct(f, lost) for f in fragments], repeat)
    return enc, dec


def zfec_rows(chunks: list[bytes], *, k: int, m: int, repeat: int) -> tuple[float, float]:
    import zfec

    encoder, decoder = zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)
    blocks = [[c[i * (len(c) // k) : (i + 1) * (len(c) // k)] for i in range(k)] for c in chunks]
    enc = best_seconds(lambda: [encoder.encode(b) for b in blocks], repeat)
    shares = [encoder.encode(b)[m:] for b in blocks]
    nums = list(range(m, k + m))
    dec = best_seconds(lambda: [decoder.decode(s, nums) for s in shares], repeat)
    return enc, dec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="data size per (k, m) in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is kept")
    parser.add_argument("--segment-mib", type=float, default=4.0, help="bytes per library call")
    parser.add_argument("--numpy", action="store_true", help="also time resurgo's pure-numpy path (slow)")
    args = parser.parse_args()

    size = args.mib * 2**20 // (8 * 64) * (8 * 64)
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    copy = np.empty_like(data)
    memcpy = size / best_seconds(lambda: np.copyto(copy, data), args.repeat) / 1e9
    lib = isal.load()
    backend = "ISA-L ec_encode_data via ctypes" if lib is not None else "numpy tables"
    print(f"{args.mib} MiB of data, best of {args.repeat}, {os.cpu_count()} cores; chunk {CHUNK_BYTES // 1024} KiB/buffer")
    print(f"resurgo CPU path: XOR on numpy uint64 for m=1, {backend} otherwise; threads over chunks")
    print(f"libraries fed {args.segment_mib:g} MiB segments; pyeclib backends {', '.join(PYECLIB_TYPES)}")
    print(f"memcpy (np.copyto, preallocated): {memcpy:.2f} GB/s\n")
    print(f"{'k,m':>5} {'codec':<26} {'encode GB/s':>12} {'decode GB/s':>12}")
    chunks = segments(data, int(args.segment_mib * 2**20) // 64 * 64)
    for k, m in SHAPES:
        rows: dict[str, tuple[float, float]] = {"resurgo": resurgo_rows(data, k=k, m=m, repeat=args.repeat, backend="auto")}
        if args.numpy:
            rows["resurgo (numpy only)"] = resurgo_rows(data, k=k, m=m, repeat=1, backend="numpy")
        for ec_type in PYECLIB_TYPES:
            rows[f"pyeclib {ec_type}"] = pyeclib_rows(chunks, k=k, m=m, repeat=args.repeat, ec_type=ec_type)
        rows["zfec"] = zfec_rows(chunks, k=k, m=m, repeat=args.repeat)
        rates = {name: (size / e / 1e9, size / d / 1e9) for name, (e, d) in rows.items()}
        for name, (e, d) in rates.items():
            print(f"{k},{m:<3} {name:<26} {e:12.2f} {d:12.2f}")
        libs = [r for name, r in rates.items() if not name.startswith("resurgo")]
        best_enc, best_dec = max(e for e, _ in libs), max(d for _, d in libs)
        enc, dec = rates["resurgo"]
        line = f"      resurgo / best library: encode {enc / best_enc:.2f}x, decode {dec / best_dec:.2f}x"
        if m == 1:
            line += f"; XOR / memcpy: encode {enc / memcpy:.2f}, decode {dec / memcpy:.2f}"
        print(line)


if __name__ == "__main__":
    main()
