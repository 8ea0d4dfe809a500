#!/usr/bin/env python3
"""Newton-Schulz in PyTorch, for comparison with `cargo bench -p muon-cuda --features cuda --bench ns_gpu`.

Prints one JSON object per line with the same keys as ns_gpu.rs: a hand-written Newton-Schulz
(Keller Jordan's quintic, 5 steps, the same formulation as muon-core: X_0 = N / (||N||_F + 1e-7),
Gram matrix on the short side, one GEMM per product) in f32, TF32 and bf16 (bf16 casts the
input and runs the whole iteration in bf16, as Keller Jordan's Muon does), and, when the
installed torch has it, a full torch.optim.Muon step on one parameter of each shape (impl
"torch.optim.Muon", precision "bf16", the precision of its Newton-Schulz: momentum,
Newton-Schulz and update; its own defaults). TFLOP/s use the
nominal count of muon_core::NewtonSchulz::flops; "gemm_peak_tflops" is an 8192^3 torch.matmul
in the same precision, measured in the same run.

Usage (on a GPU machine): python3 muon-cuda/bench/ns_torch.py [--quick]
Without CUDA it says so and exits 0.
"""

import json
import sys
import time

SHAPES = [
    (1, 128, 128),
    (1, 256, 1024),
    (1, 512, 512),
    (1, 1024, 1024),
    (1, 1024, 4096),
    (1, 2048, 2048),
    (64, 128, 352),
    (1, 4096, 4096),
    (1, 4096, 11264),
    (64, 2048, 1408),
]
QUINTIC = (3.4445, -4.7750, 2.0315)
STEPS = 5
EPS = 1e-7
PEAK_N = 8192
TARGET_SECONDS = 0.5


def flops(batch, rows, cols, steps=STEPS):
    m, n = min(rows, cols), max(rows, cols)
    return batch * steps * (4.0 * m * m * n + 2.0 * m * m * m)


def shape_name(batch, rows, cols):
    return f"{rows}x{cols}" if batch == 1 else f"{batch}x{rows}x{cols}"


def newton_schulz(g, dtype):
    """The muon-core iteration on a (batch, rows, cols) stack; returns the orthogonalized stack."""
    import torch

    a, b, c = QUINTIC
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + EPS)
    for _ in range(STEPS):
        s = x @ x.mT
        p = b * s + c * (s @ s)
        x = a * x + p @ x
    if tall:
        x = x.mT
    return x


def timed(fn, sync):
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - start
    iterations = max(3, min(2000, int(TARGET_SECONDS / max(once, 1e-6))))
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    sync()
    return (time.perf_counter() - start) / iterations


def main():
    quick = "--quick" in sys.argv
    try:
        import torch
    except ImportError:
        print("ns_torch: cannot run: torch is not installed; nothing was measured")
        return 0
    if not torch.cuda.is_available():
        print("ns_torch: cannot run: no CUDA GPU visible to torch; nothing was measured")
        return 0
    dev = torch.device("cuda")
    device = torch.cuda.get_device_name(dev)
    cap = torch.cuda.get_device_capability(dev)
    device = f"{device} (sm_{cap[0]}{cap[1]})"
    sync = torch.cuda.synchronize
    shapes = SHAPES[:4] if quick else SHAPES
    precisions = {"f32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}

    def emit(impl, precision, shape, seconds, peak):
        batch, rows, cols = shape
        tflops = flops(batch, rows, cols) / seconds / 1e12
        print(json.dumps({
            "impl": impl, "device": device, "precision": precision,
            "shape": shape_name(batch, rows, cols), "batch": batch, "rows": rows, "cols": cols,
            "steps": STEPS, "ms": round(seconds * 1e3, 4), "tflops": round(tflops, 2),
            "gemm_peak_tflops": round(peak, 2), "fraction_of_peak": round(tflops / peak, 3),
        }), flush=True)

    for name, dtype in precisions.items():
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        with torch.no_grad():
            a = torch.randn(PEAK_N, PEAK_N, device=dev, dtype=dtype)
            peak = 2.0 * PEAK_N ** 3 / timed(lambda: a @ a, sync) / 1e12
            del a
            for shape in shapes:
                g = torch.randn(*shape, device=dev, dtype=torch.float32)
                emit("torch-ns", name, shape, timed(lambda: newton_schulz(g, dtype), sync), peak)
                del g

        # torch.optim.Muon runs its Newton-Schulz in bf16 whatever the matmul settings, so it
        # is measured once, in the bf16 pass.
        muon = getattr(torch.optim, "Muon", None)
        if muon is None or name != "bf16":
            continue
        for shape in shapes:
            batch, rows, cols = shape
            if batch != 1:
                # torch.optim.Muon takes 2-D parameters only: one parameter per expert.
                params = [torch.nn.Parameter(torch.randn(rows, cols, device=dev)) for _ in range(batch)]
            else:
                params = [torch.nn.Parameter(torch.randn(rows, cols, device=dev))]
            for p in params:
                p.grad = torch.randn_like(p)
            try:
                opt = muon(params, lr=0.02)
            except (TypeError, ValueError) as e:
                print(f"ns_torch: torch.optim.Muon rejected {shape_name(*shape)}: {e}", file=sys.stderr)
                continue
            emit("torch.optim.Muon", name, shape, timed(opt.step, sync), peak)
            del opt, params
    return 0


if __name__ == "__main__":
    sys.exit(main())
