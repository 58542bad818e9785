"""Erasure coding throughput: resurgo's CPU path against pyeclib (ISA-L), zfec and a plain memory copy.

Usage: python benchmarks/erasure.py [--mib 256] [--repeat 5] [--numpy]

Throughput is GB/s of data (the k data buffers). Decode rebuilds the worst case: m lost data buffers.
The libraries get their best use: input prepared as bytes outside the timing, fed in segments of
--segment-mib (one 256 MiB call is several times slower for pyeclib), results dropped as they come.
Every contender of a (k, m) is timed in interleaved rounds and keeps its best round, so a load change
on a shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from resurgo.checkpoint.erasure.code import CHUNK_BYTES, THREADS, decode, encode
from resurgo.checkpoint.erasure.share_site import choose_site, measure_rates
from resurgo.kernels import isal

SHAPES = [(4, 1), (4, 2), (8, 2), (8, 3)]
PYECLIB_TYPES = ["isa_l_rs_vand", "isa_l_rs_cauchy"]
Task = Callable[[], object]


def keep_freed_memory_mapped() -> bool:
    """Keep glibc from returning each freed fragment-sized block to the OS: pyeclib allocates fresh
    fragments per call, and with glibc's defaults spends most of its time in page faults (0.4 vs 3.5
    GB/s encode measured). Blocks of 16 MiB and more stay mmapped, so the big numpy buffers keep their
    huge pages (memcpy slowed from 10 to 4 GB/s when they came from the heap)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 16 * 2**20) and libc.mallopt(m_trim_threshold, 2**30))


def race(tasks: dict[str, Task], repeat: int) -> dict[str, float]:
    """Best seconds of each task over `repeat` interleaved rounds (after one warm-up round)."""
    best = dict.fromkeys(tasks, float("inf"))
    for round_ in range(repeat + 1):
        for name, task in tasks.items():
            start = time.perf_counter()
            task()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def each(fn: Callable[[object], object], items: list) -> Task:
    """Call fn on every item, dropping results as a streaming user would (holding them all would
    time page faults of fresh memory, not the codec)."""

    def run() -> None:
        for item in items:
            fn(item)

    return run


def resurgo_tasks(data: np.ndarray, *, k: int, m: int, backend: str, threads: int = THREADS) -> tuple[Task, Task]:
    views = np.split(data, k)
    parity = [np.empty(views[0].size, dtype=np.uint8) for _ in range(m)]
    stripe = encode(views, m=m, out=parity, backend=backend).stripe
    survivors = {i: b for i, b in enumerate([*views, *parity]) if i >= m}
    out = {i: np.empty(views[0].size, dtype=np.uint8) for i in range(m)}
    decode(survivors, stripe, out=out, backend=backend)
    assert all(np.array_equal(out[i], views[i]) for i in range(m))
    return (
        lambda: encode(views, m=m, out=parity, backend=backend, threads=threads),
        lambda: decode(survivors, stripe, out=out, backend=backend, threads=threads),
    )


def pyeclib_tasks(chunks: list[bytes], *, k: int, m: int, ec_type: str) -> tuple[Task, Task]:
    from pyeclib.ec_iface import ECDriver

    driver = ECDriver(k=k, m=m, ec_type=ec_type)
    fragments = [driver.encode(c)[m:] for c in chunks]
    lost = list(range(m))
    return each(driver.encode, chunks), each(lambda f: driver.reconstruct(f, lost), fragments)


def zfec_tasks(chunks: list[bytes], *, k: int, m: int) -> tuple[Task, Task]:
    import zfec

    encoder, decoder = zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)
    blocks = [[c[i * (len(c) // k) : (i + 1) * (len(c) // k)] for i in range(k)] for c in chunks]
    shares = [encoder.encode(b)[m:] for b in blocks]
    nums = list(range(m, k + m))
    return each(encoder.encode, blocks), each(lambda s: decoder.decode(s, nums), shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="data size per (k, m) in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds; each contender keeps its best")
    parser.add_argument("--segment-mib", type=float, default=4.0, help="bytes per library call")
    parser.add_argument("--numpy", action="store_true", help="also time resurgo's pure-numpy fallback")
    args = parser.parse_args()
    tuned = keep_freed_memory_mapped()

    size = args.mib * 2**20 // (8 * 64) * (8 * 64)
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    copy = np.empty_like(data)
    chunks = [
        data[o : o + int(args.segment_mib * 2**20)].tobytes() for o in range(0, size, int(args.segment_mib * 2**20))
    ]
    backend = "ISA-L ec_encode_data via ctypes" if isal.load() is not None else "numpy (no libisal found)"
    print(f"{args.mib} MiB of data per (k,m), best of {args.repeat} interleaved rounds, {os.cpu_count()} cores")
    print(
        f"resurgo CPU path: {backend}, zero-copy, {CHUNK_BYTES // 2**20} MiB chunks per buffer, 1 thread (and {THREADS}, as the keepers run it)"
    )
    print(
        f"libraries: pyeclib {', '.join(PYECLIB_TYPES)} and zfec, fed {args.segment_mib:g} MiB segments"
        f"{', glibc keeps freed memory (mallopt)' if tuned else ''}"
    )
    print("memcpy = np.copyto of the same bytes into a preallocated buffer, timed in the same rounds\n")
    print(f"{'k,m':>5} {'codec':<26} {'encode GB/s':>12} {'decode GB/s':>12}")
    for k, m in SHAPES:
        # The libraries and memcpy run on one thread: resurgo's headline is its one-thread row.
        pairs = {
            "resurgo": resurgo_tasks(data, k=k, m=m, backend="auto", threads=1),
            f"resurgo ({THREADS} threads)": resurgo_tasks(data, k=k, m=m, backend="auto"),
        }
        if args.numpy:
            pairs["resurgo (numpy fallback)"] = resurgo_tasks(data, k=k, m=m, backend="numpy")
        for ec_type in PYECLIB_TYPES:
            pairs[f"pyeclib {ec_type}"] = pyeclib_tasks(chunks, k=k, m=m, ec_type=ec_type)
        pairs["zfec"] = zfec_tasks(chunks, k=k, m=m)
        tasks = {"memcpy": lambda: np.copyto(copy, data)}
        for name, (enc, dec) in pairs.items():
            tasks[f"{name}/enc"], tasks[f"{name}/dec"] = enc, dec
        rate = {name: size / seconds / 1e9 for name, seconds in race(tasks, args.repeat).items()}
        for name in pairs:
            print(f"{k},{m:<3} {name:<26} {rate[name + '/enc']:12.2f} {rate[name + '/dec']:12.2f}")
        print(f"{k},{m:<3} {'memcpy':<26} {rate['memcpy']:12.2f}")
        libs = [n for n in pairs if not n.startswith("resurgo")]
        best_enc = max(libs, key=lambda n: rate[n + "/enc"])
        best_dec = max(libs, key=lambda n: rate[n + "/dec"])
        enc, dec = rate["resurgo/enc"], rate["resurgo/dec"]
        line = (
            f"      resurgo / best library, one thread each: encode {enc / rate[best_enc + '/enc']:.2f}x ({best_enc}), "
            f"decode {dec / rate[best_dec + '/dec']:.2f}x ({best_dec})"
        )
        if m == 1:
            line += f"\n      XOR / memcpy: encode {enc / rate['memcpy']:.2f}, decode {dec / rate['memcpy']:.2f}"
        print(line)
    device = torch.device("cuda") if torch.cuda.is_available() else None
    site, why = choose_site("auto", m=2, rates=measure_rates(device))
    print(f"\nwhere shares of parity rows >= 1 are scaled (fault.erasure.encode=auto, m=2): {site}, as {why}")


if __name__ == "__main__":
    main()
