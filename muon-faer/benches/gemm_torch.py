#!/usr/bin/env python3
"""Square bf16 GEMM throughput in PyTorch (oneDNN: AMX or AVX512-BF16 where the CPU has them),
the peer of muon-faer's benches/gemm.rs, with the same JSON keys.

  impl "torch", op "gemm", precision "bf16": torch.matmul on bf16 tensors (bf16 out, f32
      accumulation inside oneDNN). The operands are converted to bf16 before timing; the
      output is bf16 (half the bytes of muon-faer's f32 output).
  precision "f32": torch.matmul on f32 tensors (MKL/oneDNN sgemm), for reference.

Usage: python3 gemm_torch.py [--threads 1,2] [--sizes 1024,2048,4096] [--target-s 2]
                             [--precisions bf16,f32]
"""
import argparse
import json
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--target-s", type=float, default=2.0)
    ap.add_argument("--precisions", default="bf16,f32")
    a = ap.parse_args()
    print(json.dumps({"meta": True, "torch": torch.__version__,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}), file=sys.stderr)
    torch.manual_seed(0)
    for t in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(t)
        for n in [int(x) for x in a.sizes.split(",")]:
            x, y = torch.randn(n, n), torch.randn(n, n)
            for p in a.precisions.split(","):
                dt = {"bf16": torch.bfloat16, "f32": torch.float32}[p]
                xa, ya = x.to(dt), y.to(dt)

                def run():
                    t0 = time.perf_counter()
                    torch.matmul(xa, ya)
                    return time.perf_counter() - t0

                with torch.no_grad():
                    run()
                    est = run()
                    reps = max(3, min(100, int(a.target_s / est + 0.999)))
                    times = sorted(run() for _ in range(reps))
                med, mn = times[reps // 2], times[0]
                flops = 2.0 * n ** 3
                print(json.dumps({"impl": "torch", "op": "gemm", "precision": p, "kernel": "onednn",
                                  "n": n, "threads": t, "ms_median": round(med * 1e3, 3),
                                  "ms_min": round(mn * 1e3, 3), "gflops": round(flops / med / 1e9, 1),
                                  "gflops_peak": round(flops / mn / 1e9, 1), "reps": reps}), flush=True)


if __name__ == "__main__":
    main()
