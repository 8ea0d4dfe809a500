#!/usr/bin/env bash
# Interleaved bf16 benchmark: muon-faer against torch in the same run, each case back to back
# so a busy shared machine slows both alike. JSON lines on stdout; summarize with
# `python3 muon-faer/benches/table_bf16.py FILE`.
#
#   muon-faer/benches/compare_bf16.sh [target_s] [ns_shapes] [threads] [rounds] [gemm_sizes]
#
# Per round, for each thread count: the square GEMMs (torch.matmul on bf16 tensors, then
# muon-faer's bf16 and f32 products), then for each Newton-Schulz shape torch.optim.Muon's
# own `_zeropower_via_newtonschulz` (bf16), muon-faer in bf16 and in f32.
# Needs: pip install torch numpy; the torch Newton-Schulz script in $NS_TORCH_BENCH
# (default muon-faer/benches/ns_torch.py). Run from the workspace root.
set -euo pipefail
TARGET_S=${1:-1}
SHAPES=${2:-128x128,256x1024,512x512,1024x1024,1024x4096,2048x2048,64x128x352}
THREADS=${3:-1,2}
ROUNDS=${4:-1}
SIZES=${5:-1024,2048,4096}
NS_TORCH=${NS_TORCH_BENCH:-muon-faer/benches/ns_torch.py}
bench_exe() {
  cargo bench -p muon-faer --bench "$1" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]==sys.argv[1] and m.get("executable"): print(m["executable"])' "$1" | tail -1
}
if ! grep -qw -e avx512_bf16 -e amx_bf16 /proc/cpuinfo 2>/dev/null; then
  echo "compare_bf16.sh: this CPU has neither AVX512-BF16 nor AMX-BF16: muon-faer's bf16 runs" \
       "its f32 products, and torch's bf16 may have no fast path (~100x slower than its f32 on" \
       "an AMD Zen 3), making the large sizes take minutes; compare.sh (PEERS=numpy,torch)" \
       "compares the f32 products" >&2
fi
cargo bench -p muon-faer --bench ns --bench gemm --no-run >&2
NS=$(bench_exe ns)
GEMM=$(bench_exe gemm)
for round in $(seq "$ROUNDS"); do
  for t in ${THREADS//,/ }; do
    for n in ${SIZES//,/ }; do
      python3 muon-faer/benches/gemm_torch.py --threads "$t" --sizes "$n" --target-s "$TARGET_S" --precisions bf16 2>/dev/null
      "$GEMM" --threads "$t" --sizes "$n" --target-s "$TARGET_S" --precisions bf16,f32
    done
    for shape in ${SHAPES//,/ }; do
      python3 "$NS_TORCH" --shapes "$shape" --threads "$t" --target-s "$TARGET_S" --impls torch-muon 2>/dev/null
      "$NS" --shapes "$shape" --threads "$t" --target-s "$TARGET_S" --no-gemm --no-step --precision bf16 2>/dev/null
      "$NS" --shapes "$shape" --threads "$t" --target-s "$TARGET_S" --no-gemm --no-step 2>/dev/null
    done
  done
done
