#!/usr/bin/env python3
"""Newton-Schulz (the quintic, 5 steps) in PyTorch on the CPU: a second peer of `benches/ns.rs`.

Two implementations, one JSON line per (impl, shape, threads) with the keys of ns_numpy.py and
of the Rust benchmark, so `table.py` joins them:
  "torch-f32"   the iteration in float32 (torch's CPU sgemm; X X^T as a plain matmul), a stack
                run batched (one bmm per product);
  "torch-muon"  torch.optim.Muon's own Newton-Schulz (torch >= 2.9), as installed: it casts to
                bfloat16, which oneDNN runs on AMX-BF16 / AVX512-BF16 where the CPU has them;
                it takes 2-D matrices only, so a stack runs in a Python loop.
Flops are nominal: 5 (4 m^2 n + 2 m^3) per matrix, m = min side, n = max side.

  pip install torch
  python3 ns_torch.py [--threads 1,2] [--shapes 128x128,64x128x352] [--target-s 2]
      [--impls torch-f32,torch-muon]
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch

A_COEF, B_COEF, C_COEF = 3.4445, -4.7750, 2.0315
DEFAULT_SHAPES = "128x128,256x1024,512x512,1024x1024,1024x4096,2048x2048,64x128x352"


def ns5_f32(g, steps=5, eps=1e-7):
    """The quintic on a matrix or a stack ([..., M, N]), in float32."""
    x = g
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.mT
        p = B_COEF * s + C_COEF * (s @ s)
        x = A_COEF * x + p @ x
    return x.mT if transposed else x


def torch_muon_ns():
    """torch.optim.Muon's orthogonalization with the same coefficients, steps and eps."""
    from torch.optim import _muon

    f = _muon._zeropower_via_newtonschulz
    coefficients = (A_COEF, B_COEF, C_COEF)

    def run(g):
        if g.ndim == 3:
            return [f(m, coefficients, 5, 1e-7) for m in g]
        return f(g, coefficients, 5, 1e-7)

    return run


def ns5_flops(dims):
    b, m, n = (1, *dims) if len(dims) == 2 else dims
    lo, hi = min(m, n), max(m, n)
    return b * 5 * (4 * lo * lo * hi + 2 * lo**3)


def time_fn(fn, target_s, min_reps=5, max_reps=200):
    """Seconds per call, timed as ns_numpy.py times: warm-up, estimate, target_s / estimate calls."""
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--target-s", type=float, default=2.0, help="about this many seconds of timed runs per case")
    ap.add_argument("--impls", default="torch-f32,torch-muon")
    args = ap.parse_args()
    capability = torch.backends.cpu.get_cpu_capability()
    print(json.dumps({"meta": True, "torch": torch.__version__, "mkl": torch.backends.mkl.is_available(),
                      "cpu_capability": capability}), file=sys.stderr, flush=True)
    impls = {"torch-f32": ns5_f32, "torch-muon": torch_muon_ns()}
    torch.manual_seed(0)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for s in args.shapes.split(","):
            dims = tuple(int(x) for x in s.split("x"))
            g = torch.randn(*dims, dtype=torch.float32)
            flops = ns5_flops(dims)
            for name in args.impls.split(","):
                run = impls[name]
                with torch.no_grad():
                    times = time_fn(lambda: run(g), args.target_s)
                med, mn = statistics.median(times), min(times)
                print(json.dumps({"impl": name, "op": "ns5", "shape": s, "threads": threads,
                                  "ms_median": round(med * 1e3, 4), "ms_min": round(mn * 1e3, 4),
                                  "gflops": round(flops / med / 1e9, 2), "gflops_peak": round(flops / mn / 1e9, 2),
                                  "reps": len(times), "blas_kernel": f"torch-{torch.__version__}-{capability}"}),
                      flush=True)


if __name__ == "__main__":
    main()
