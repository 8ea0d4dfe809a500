"""Markdown tables from compare_bf16.sh's JSON lines: the median over rounds of each side's
per-run median, the ratio ours / torch as speed (torch's time over ours), and the best runs."""
import collections
import json
import statistics
import sys

runs = collections.defaultdict(list)
for path in sys.argv[1:]:
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r.get("meta"):
            continue
        if r.get("op") == "gemm":
            key = ("gemm", f"{r['n']}^3", r["threads"], f"{r['impl']}-{r['precision']}")
        elif r.get("op") == "ns5":
            key = ("ns5", r["shape"], r["threads"], r["impl"])
        else:
            continue
        runs[key].append((r["ms_median"], r["ms_min"]))


def med(key):
    v = runs.get(key)
    return (statistics.median(x[0] for x in v), min(x[1] for x in v), len(v)) if v else None


def gflops(case, ms):
    if case.endswith("^3"):
        n = int(case[:-2])
        return 2 * n**3 / ms / 1e6
    d = [int(x) for x in case.split("x")]
    b, m, n = (1, *d) if len(d) == 2 else d
    a, c = min(m, n), max(m, n)
    return b * 5 * (4 * a * a * c + 2 * a**3) / ms / 1e6


def table(op, torch_impl, ours, f32):
    cases = sorted({(k[1], k[2]) for k in runs if k[0] == op}, key=lambda c: (c[1], c[0] not in ORDER, ORDER.index(c[0]) if c[0] in ORDER else 0))
    print(f"| {'size' if op == 'gemm' else 'shape'} | threads | torch ms | muon-faer bf16 ms | bf16 GFLOP/s | bf16 / torch (speed) | best runs: torch / bf16 ms | best ratio | muon-faer f32 ms | bf16 vs f32 | runs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case, t in cases:
        a, b, c = (med((op, case, t, i)) for i in (torch_impl, ours, f32))
        if not a or not b:
            continue
        f = f"{c[0]:.2f}" if c else "-"
        g = f"{c[0] / b[0]:.2f}x" if c else "-"
        print(f"| {case} | {t} | {a[0]:.2f} | {b[0]:.2f} | {gflops(case, b[0]):.0f} | {a[0] / b[0]:.2f}x | {a[1]:.2f} / {b[1]:.2f} | {a[1] / b[1]:.2f}x | {f} | {g} | {b[2]} |")


ORDER = ["1024^3", "2048^3", "4096^3", "128x128", "256x1024", "512x512", "1024x1024", "1024x4096", "2048x2048", "64x128x352"]
print("GEMM (nominal 2 n^3 flops)\n")
table("gemm", "torch-bf16", "muon-faer-bf16", "muon-faer-f32")
print("\nNewton-Schulz, quintic, 5 steps (nominal flops)\n")
table("ns5", "torch-muon", "muon-faer-bf16", "muon-faer")
