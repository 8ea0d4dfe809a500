#!/usr/bin/env bash
# Interleaved Newton-Schulz benchmark of muon-faer against its Python peers: for each shape and
# thread count, numpy (default OpenBLAS kernel, then OPENBLAS_CORETYPE=Haswell), torch when
# asked, muon-faer and muon-faer-generic (muon-core's generic Newton-Schulz on the same
# backend) run back to back, so a busy machine slows them alike. JSON lines on stdout (the keys
# of ns_numpy.py); `table.py` turns them into the README's table.
#
#   muon-faer/benches/compare.sh [target_s] [shapes] [threads] [rounds]
#   PEERS=numpy,torch muon-faer/benches/compare.sh ...     (default PEERS=numpy)
#   TORCH_IMPLS=torch-f32 ...    (ns_torch.py's implementations; default torch-f32,torch-muon:
#                                 torch-muon casts to bf16, which torch ran ~100x slower than
#                                 f32 on an AMD Zen 3, so large shapes take minutes there)
# Needs: pip install numpy threadpoolctl (and torch for the torch peer). Runs from any
# directory: paths are found from this script's location.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_S=${1:-1}
SHAPES=${2:-128x128,256x1024,512x512,1024x1024,1024x4096,2048x2048,64x128x352}
THREADS=${3:-1,2}
ROUNDS=${4:-1}
PEERS=${PEERS:-numpy}
TORCH_IMPLS=${TORCH_IMPLS:-torch-f32,torch-muon}
cd "$ROOT"
cargo bench -p muon-faer --bench ns --no-run >&2
BENCH=$(cargo bench -p muon-faer --bench ns --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "ns" and m.get("executable"):
        print(m["executable"])' | tail -1)
for round in $(seq "$ROUNDS"); do
  for shape in ${SHAPES//,/ }; do
    for t in ${THREADS//,/ }; do
      args=(--shapes "$shape" --threads "$t" --target-s "$TARGET_S")
      if [[ ",$PEERS," == *,numpy,* ]]; then
        env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 "$HERE/ns_numpy.py" "${args[@]}" 2>/dev/null
        env -u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=Haswell python3 "$HERE/ns_numpy.py" "${args[@]}" 2>/dev/null
      fi
      if [[ ",$PEERS," == *,torch,* ]]; then
        python3 "$HERE/ns_torch.py" "${args[@]}" --impls "$TORCH_IMPLS" 2>/dev/null
      fi
      "$BENCH" "${args[@]}" --no-gemm --no-step --generic 2>/dev/null
    done
  done
done
