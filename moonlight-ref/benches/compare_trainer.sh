#!/usr/bin/env bash
# moonlight-ref's forward + backward in f32 and bf16 products (benches/model.rs) against
# HuggingFace transformers' DeepseekV3 built as the same preset, in f32 and under bf16 autocast
# (benches/trainer_torch.py), side by side on the same machine in one run.
#
#   moonlight-ref/benches/compare_trainer.sh [--presets tiny,small] [--shape 32x128]
#       [--threads 1,2] [--reps 2] [--hf-steps 8] [--ml-steps 3] [--hf-dtypes f32,bf16]
#
# `--hf-dtypes f32` leaves HF's bf16 autocast out: on a CPU without a bf16 path in torch (an
# AMD Zen 3, measured: bf16 products ~100x slower than its f32) "HF's best" is its f32.
#
# PYTHON names the interpreter with torch and transformers installed (default python3). The
# runs alternate (for each repetition and thread count: HF, then moonlight-ref), so a load that
# comes and goes on a shared machine hits both; every ratio is taken within one repetition and
# the table shows the median over repetitions. Columns: forward + backward ms per step (HF: the
# median over its steps; moonlight-ref: the mean over its steps), bf16's speed over HF's faster
# dtype and over moonlight-ref's own f32, and the optimizer step's share of a whole step
# (Muon + AdamW, `HybridOptimizer::step`) for each precision.
set -euo pipefail

presets=tiny,small shape=32x128 threads=1,2 reps=2 hf_steps=8 ml_steps=3 hf_dtypes=f32,bf16
while [[ $# -gt 0 ]]; do
    case $1 in
        --presets) presets=$2 ;;
        --shape) shape=$2 ;;
        --threads) threads=$2 ;;
        --reps) reps=$2 ;;
        --hf-steps) hf_steps=$2 ;;
        --ml-steps) ml_steps=$2 ;;
        --hf-dtypes) hf_dtypes=$2 ;;
        *) echo "compare_trainer.sh: unknown option $1 (see the header)" >&2; exit 2 ;;
    esac
    [[ $# -ge 2 ]] || { echo "compare_trainer.sh: $1 needs a value" >&2; exit 2; }
    shift 2
done
[[ $shape =~ ^[1-9][0-9]*x[1-9][0-9]*$ ]] || { echo "--shape $shape: expected BxT, e.g. 32x128" >&2; exit 2; }
for n in "$reps" "$hf_steps" "$ml_steps"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "compare_trainer.sh: $n: expected a positive integer" >&2; exit 2; }
done
batch=${shape%x*} seq=${shape#*x}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
"$python" -c 'import torch, transformers' 2>/dev/null || {
    echo "compare_trainer.sh: $python cannot import torch and transformers (set PYTHON)" >&2
    exit 2
}

bench=$(cargo bench -q -p moonlight-ref --bench model --no-run --message-format=json 2>/dev/null |
    "$python" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "model" and m.get("executable"):
        print(m["executable"])')
[[ -x $bench ]] || { echo "compare_trainer.sh: cannot find the model bench's binary" >&2; exit 2; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-); load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for rep in $(seq "$reps"); do
    for t in ${threads//,/ }; do
        echo "rep $rep, $t threads: HF DeepseekV3" >&2
        "$python" "$here/trainer_torch.py" --presets "$presets" --shapes "$shape" --threads "$t" \
            --dtypes "$hf_dtypes" --steps "$hf_steps" --warmup 2 | sed "s/^/rep=$rep hf /" >>"$log"
        for p in ${presets//,/ }; do
            echo "rep $rep, $t threads: moonlight-ref $p" >&2
            "$bench" --preset "$p" --batch "$batch" --seq "$seq" --steps "$ml_steps" --threads "$t" \
                --precision both | sed "s/^/rep=$rep ml /" >>"$log"
        done
    done
done

"$python" - "$log" "$shape" "$reps" <<'EOF'
import json, re, statistics, sys
hf, ml = {}, {}  # (rep, preset, threads, dtype) -> fwd+bwd ms (and the optimizer's share)
line_re = re.compile(r"^(\w+) B=\d+ T=\d+ (f32|bf16) \(([^)]*)\) on (\d+) threads: .*\(([\d.]+) ms/step.*"
                     r"optimizer ([\d.]+) ms \(([\d.]+)% of the step\)")
kernel = "?"
for line in open(sys.argv[1]):
    rep, kind, rest = line.split(" ", 2)
    rep = int(rep.split("=")[1])
    if kind == "hf":
        r = json.loads(rest)
        hf[(rep, r["preset"], r["threads"], r["dtype"])] = r["fwd_bwd_ms_median"]
    elif (m := line_re.match(rest)):
        preset, dtype, k, th, ms, opt_ms, share = m.groups()
        if dtype == "bf16":
            kernel = k
        ml[(rep, preset, int(th), dtype)] = (float(ms), float(share))
print(f"forward+backward ms/step, median of {sys.argv[3]} repetitions; moonlight-ref bf16 on {kernel}")
print("| preset | B x T | threads | HF f32 | HF bf16 | ml-ref f32 | ml-ref bf16 | bf16 vs HF best | "
      "bf16 vs ml-ref f32 | optimizer share f32 / bf16 |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
keys = sorted({k[1:3] for k in ml}, key=lambda k: (k[0] != "tiny", k))
med = lambda xs: statistics.median(xs) if xs else float("nan")
for preset, th in keys:
    reps = sorted({k[0] for k in ml if k[1:3] == (preset, th)})
    get = lambda d, rep, dt: d.get((rep, preset, th, dt))
    col = {}
    for name, d, dt in [("hf32", hf, "f32"), ("hf16", hf, "bf16")]:
        col[name] = med([get(d, r, dt) for r in reps if get(d, r, dt) is not None])
    for name, dt in [("ml32", "f32"), ("ml16", "bf16")]:
        col[name] = med([get(ml, r, dt)[0] for r in reps if get(ml, r, dt)])
        col[name + "s"] = med([get(ml, r, dt)[1] for r in reps if get(ml, r, dt)])
    best_hf = lambda r: min((x for x in (get(hf, r, "f32"), get(hf, r, "bf16")) if x), default=None)
    vs_hf = med([best_hf(r) / get(ml, r, "bf16")[0] for r in reps if best_hf(r) and get(ml, r, "bf16")])
    vs_f32 = med([get(ml, r, "f32")[0] / get(ml, r, "bf16")[0]
                  for r in reps if get(ml, r, "f32") and get(ml, r, "bf16")])
    ms = lambda x: "-" if x != x else f"{x:.1f}"  # NaN: not measured
    print(f"| {preset} | {sys.argv[2]} | {th} | {ms(col['hf32'])} | {ms(col['hf16'])} | {col['ml32']:.1f} | "
          f"{col['ml16']:.1f} | {vs_hf:.2f}x | {vs_f32:.2f}x | {col['ml32s']:.1f}% / {col['ml16s']:.1f}% |")
EOF
