#!/usr/bin/env python3
"""Joins the JSON lines of benches/ns.rs and its Python peers into the README's Markdown table.

  python3 muon-faer/benches/table.py round1.jsonl [round2.jsonl ...]

Reads every Newton-Schulz line ("op": "ns5") of the files: muon-faer (and muon-faer-generic,
from `--generic`), numpy (ns_numpy.py, labelled by its BLAS kernel) and torch (ns_torch.py).
Per shape and thread count it prints the median over runs of each one's median time, muon-faer's
nominal GFLOP/s, its speed-up over the fastest peer (on those medians, and on the best single
runs), and what the backend's own Newton-Schulz gains over muon-core's generic one.
"""
import collections
import json
import statistics
import sys

OURS, GENERIC = "muon-faer", "muon-faer-generic"


def label(r):
    if r["impl"] == "numpy":
        return f"numpy {r.get('blas_kernel')}"
    return r["impl"]


def nominal_flops(shape):
    dims = [int(x) for x in shape.split("x")]
    b, m, n = (1, *dims) if len(dims) == 2 else dims
    lo, hi = min(m, n), max(m, n)
    return b * 5 * (4 * lo * lo * hi + 2 * lo**3)


def main(paths):
    medians = collections.defaultdict(lambda: collections.defaultdict(list))
    minima = collections.defaultdict(lambda: collections.defaultdict(list))
    shapes, peers = [], []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                r = json.loads(line)
                if r.get("op") != "ns5":
                    continue
                key, name = (r["shape"], r["threads"]), label(r)
                medians[key][name].append(r["ms_median"])
                minima[key][name].append(r["ms_min"])
                if r["shape"] not in shapes:
                    shapes.append(r["shape"])
                if name not in (OURS, GENERIC) and name not in peers:
                    peers.append(name)
    peers.sort()
    # Single matrices by size, then stacks.
    shapes.sort(key=lambda s: (s.count("x") > 1, nominal_flops(s)))
    head = ["shape", "threads", *(f"{p} ms" for p in peers), "muon-faer ms", "muon-faer GFLOP/s (nominal)",
            "vs best peer (medians)", "best runs: peer / muon-faer ms", "ratio", "generic ms", "own vs generic",
            "runs"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for threads in sorted({t for _, t in medians}):
        for shape in shapes:
            med, mn = medians.get((shape, threads)), minima.get((shape, threads))
            if not med or OURS not in med:
                continue
            ours = statistics.median(med[OURS])
            peer_ms = {p: statistics.median(med[p]) for p in peers if p in med}
            cells = [shape, str(threads), *(f"{peer_ms[p]:.2f}" if p in peer_ms else "-" for p in peers),
                     f"{ours:.2f}", f"{nominal_flops(shape) / ours / 1e6:.0f}"]
            if peer_ms:
                best_run_peer, best_run_ours = min(min(mn[p]) for p in peer_ms), min(mn[OURS])
                cells += [f"{min(peer_ms.values()) / ours:.2f}x", f"{best_run_peer:.2f} / {best_run_ours:.2f}",
                          f"{best_run_peer / best_run_ours:.2f}x"]
            else:
                cells += ["-", "-", "-"]
            if GENERIC in med:
                generic = statistics.median(med[GENERIC])
                cells += [f"{generic:.2f}", f"{generic / ours:.2f}x"]
            else:
                cells += ["-", "-"]
            cells.append(str(len(med[OURS])))
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
