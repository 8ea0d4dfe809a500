#!/usr/bin/env python3
"""Newton-Schulz (the quintic, 5 steps) in numpy, float32: the CPU peer of `benches/ns.rs`.

Prints one JSON line per (shape, threads) on stdout with the keys the Rust benchmark prints,
so `table.py` joins the two:
  {"impl": "numpy", "op": "ns5", "shape": "1024x1024", "threads": 1, "ms_median": ...,
   "ms_min": ..., "gflops": ..., "gflops_peak": ..., "reps": ..., "blas_kernel": "SkylakeX"}
With --gemm, also square sgemm ("op": "sgemm", shape "NxNxN"): the machine's GEMM peak.
numpy and BLAS versions go to stderr.

Flops are nominal, m = min side, n = max side: per step 2 m m n (X X^T) + 2 m m m (A A) +
2 m m n (B X), 5 steps, times the batch. numpy may run X X^T as syrk (half the work); every
implementation is still scored on the nominal count. "gflops" is from ms_median,
"gflops_peak" from ms_min. A shape "BxMxN" is a batch of B matrices, run in a Python loop.

OpenBLAS picks its kernel by CPU; on some CPUs its AVX2 kernel (OPENBLAS_CORETYPE=Haswell)
beats the default, so compare with both (compare.sh does).

  pip install numpy threadpoolctl
  env -u OPENBLAS_CORETYPE python3 ns_numpy.py [--threads 1,2] [--shapes 128x128,64x128x352]
      [--gemm] [--gemm-sizes 1024,2048] [--no-ns] [--target-s 2] [--seed 0]
"""
import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

A_COEF, B_COEF, C_COEF = 3.4445, -4.7750, 2.0315
DEFAULT_SHAPES = "128x128,256x1024,512x512,1024x1024,1024x4096,2048x2048,64x128x352"


def ns5(g, steps=5, eps=1e-7):
    """The quintic Newton-Schulz on one matrix, in float32."""
    x = g.astype(np.float32, copy=False)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (np.linalg.norm(x) + np.float32(eps))
    a, b, c = np.float32(A_COEF), np.float32(B_COEF), np.float32(C_COEF)
    for _ in range(steps):
        s = x @ x.T
        p = b * s + c * (s @ s)
        x = a * x + p @ x
    return x.T if transposed else x


def ns5_flops(rows, cols, steps=5):
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m * m * m)


def parse_shape(s):
    dims = [int(x) for x in s.lower().split("x")]
    if len(dims) == 2:
        return 1, dims[0], dims[1]
    if len(dims) == 3:
        return dims[0], dims[1], dims[2]
    raise ValueError(f"bad shape {s!r}: expected MxN or BxMxN")


def time_fn(fn, target_s, min_reps=5, max_reps=200):
    """Seconds per call: one warm-up, one estimate, then target_s / estimate calls."""
    fn()
    t0 = time.perf_counter()
    fn()
    estimate = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, math.ceil(target_s / max(estimate, 1e-6)))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def record(op, shape, threads, flops, times, kernel, **extra):
    med, mn = statistics.median(times), min(times)
    rec = {"impl": "numpy", "op": op, "shape": shape, "threads": threads,
           "ms_median": round(med * 1e3, 4), "ms_min": round(mn * 1e3, 4),
           "gflops": round(flops / med / 1e9, 2), "gflops_peak": round(flops / mn / 1e9, 2),
           "reps": len(times), "blas_kernel": kernel}
    rec.update(extra)
    print(json.dumps(rec), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--gemm", action="store_true", help="also time square sgemm")
    ap.add_argument("--gemm-sizes", default="1024,2048")
    ap.add_argument("--no-ns", action="store_true", help="skip Newton-Schulz")
    ap.add_argument("--target-s", type=float, default=2.0, help="about this many seconds of timed runs per case")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    blas = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "threading_layer", "num_threads")}
            for d in threadpool_info() if d.get("user_api") == "blas"]
    print(json.dumps({"meta": True, "numpy": np.__version__, "blas": blas}), file=sys.stderr, flush=True)
    kernel = ",".join(str(b.get("architecture")) for b in blas) or None
    rng = np.random.default_rng(args.seed)

    for threads in [int(t) for t in args.threads.split(",")]:
        with threadpool_limits(limits=threads, user_api="blas"):
            if args.gemm:
                for n in [int(s) for s in args.gemm_sizes.split(",")]:
                    x = rng.standard_normal((n, n), dtype=np.float32)
                    y = rng.standard_normal((n, n), dtype=np.float32)
                    out = np.empty((n, n), dtype=np.float32)
                    times = time_fn(lambda: np.matmul(x, y, out=out), args.target_s)
                    record("sgemm", f"{n}x{n}x{n}", threads, 2.0 * n**3, times, kernel)
            if args.no_ns:
                continue
            for s in args.shapes.split(","):
                batch, m, n = parse_shape(s)
                gs = [rng.standard_normal((m, n), dtype=np.float32) for _ in range(batch)]
                times = time_fn(lambda: [ns5(g) for g in gs], args.target_s)
                extra = {"ms_median_per_matrix": round(statistics.median(times) * 1e3 / batch, 4)} if batch > 1 else {}
                record("ns5", s, threads, batch * ns5_flops(m, n), times, kernel, **extra)


if __name__ == "__main__":
    main()
