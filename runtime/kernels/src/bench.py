"""Throughput of the selected kernels backend (a measurement script, not a test).

    python -m ggufile.runtime.kernels.src.bench [--rows 2048 --k 2048 --threads N]

Prints decode matvec (n_tok=1) GB/s of weight bytes per type, single- and multi-threaded,
the per-call overhead on a tiny matrix, and prefill GFLOP/s.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from ggufile.runtime import kernels
from ggufile.runtime.gguf.constants import QUANT_TABLE, GGMLType
from ggufile.runtime.kernels import compiled

TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q2_K,
         GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.F16, GGMLType.BF16, GGMLType.F32]


def weight(qtype: GGMLType, rows: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    if qtype == GGMLType.F32:
        return rng.standard_normal((rows, k)).astype(np.float32)
    if qtype == GGMLType.F16:
        return rng.standard_normal((rows, k)).astype(np.float16)
    if qtype == GGMLType.BF16:  # the top halves of float32s (the reader gives BF16 as uint16)
        return (rng.standard_normal((rows, k)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    info = QUANT_TABLE[qtype]
    w = rng.integers(0, 256, (rows * k // info.block_size, info.type_size), dtype=np.uint8)
    # Keep every fp16 scale finite: zero the top byte's exponent bits at each 2-byte field.
    w[:, 1::2] &= 0x3B
    return w.reshape(rows, -1)


def best_time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--prefill", type=int, default=128)
    args = ap.parse_args()
    impl = kernels._impl
    print(f"backend {kernels.backend}, threads {getattr(getattr(impl, 'pool', None), 'n_threads', 1)}")
    x1 = np.random.default_rng(1).standard_normal((1, args.k)).astype(np.float32)
    xp = np.random.default_rng(2).standard_normal((args.prefill, args.k)).astype(np.float32)
    out1 = np.empty((1, args.rows), np.float32)
    outp = np.empty((args.prefill, args.rows), np.float32)
    print(f"{'type':6} {'MB':>6} {'1-thr GB/s':>10} {'pool GB/s':>10} {'prefill GFLOP/s':>16}")
    for qtype in TYPES:
        w = weight(qtype, args.rows, args.k)
        w.flags.writeable = False
        pool = getattr(impl, "pool", None)
        single = multi = float("nan")
        if pool is not None:
            n = pool.n_threads
            pool.n_threads = 1
            single = w.nbytes / best_time(lambda: kernels.matmul(w, qtype, x1, out1), 20) / 1e9
            pool.n_threads = n
        multi = w.nbytes / best_time(lambda: kernels.matmul(w, qtype, x1, out1), 20) / 1e9
        flops = 2 * args.prefill * args.rows * args.k
        pre = flops / best_time(lambda: kernels.matmul(w, qtype, xp, outp), 3) / 1e9
        print(f"{qtype.name:6} {w.nbytes / 1e6:6.2f} {single:10.2f} {multi:10.2f} {pre:16.1f}")
    tiny = weight(GGMLType.Q4_1, 64, 64)
    xt = np.ones((1, 64), np.float32)
    outt = np.empty((1, 64), np.float32)
    per_call = best_time(lambda: [kernels.matmul(tiny, GGMLType.Q4_1, xt, outt) for _ in range(1000)], 5)
    print(f"per-call overhead (64x64 Q4_1 matvec): {per_call * 1e3:.1f} us")
    big = weight(GGMLType.Q4_1, 256, 576)
    print(f"decode tasks split above {compiled.MIN_PARALLEL_WORK} weight bytes x tokens; "
          f"256x576 Q4_1 = {big.nbytes} bytes")


if __name__ == "__main__":
    main()
