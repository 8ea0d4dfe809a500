#!/usr/bin/env bash
# Interleaved muon-faer vs numpy Newton-Schulz benchmark: for each shape and thread count,
# numpy (default OpenBLAS kernel, then OPENBLAS_CORETYPE=Haswell), muon-faer and muon-faer-generic
# (muon-core's generic Newton-Schulz on the same backend) run back to back,
# so a busy shared machine slows both alike. JSON lines on stdout (keys of ns_bench_numpy.py).
#
#   muon-faer/benches/compare.sh [target_s] [shapes] [threads] [rounds]
# Needs: pip install numpy threadpoolctl; run from the workspace root.
set -euo pipefail
TARGET_S=${1:-1}
SHAPES=${2:-128x128,256x1024,512x512,1024x1024,1024x4096,2048x2048,64x128x352}
THREADS=${3:-1,2}
ROUNDS=${4:-1}
NUMPY=${NUMPY_BENCH:-/work/shared/tools/ns_bench_numpy.py}
cargo bench -p muon-faer --bench ns --no-run >&2
BENCH=$(cargo bench -p muon-faer --bench ns --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="ns" and m.get("executable"): print(m["executable"])' | tail -1)
for round in $(seq "$ROUNDS"); do
  for shape in ${SHAPES//,/ }; do
    for t in ${THREADS//,/ }; do
      env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 "$NUMPY" --shapes "$shape" --threads "$t" --target-s "$TARGET_S" 2>/dev/null
      env -u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=Haswell python3 "$NUMPY" --shapes "$shape" --threads "$t" --target-s "$TARGET_S" 2>/dev/null
      "$BENCH" --shapes "$shape" --threads "$t" --target-s "$TARGET_S" --no-gemm --no-step --generic 2>/dev/null
    done
  done
done
