#!/usr/bin/env bash
# One call on a GPU machine for the training speed targets (docs/PERFORMANCE.md), most important
# first, each step under its own timeout so the call fits one device command (600 s): our B/4 step
# eager and as a CUDA graph, the PyTorch port and the official JAX code in the same call, TF32,
# XL/2 (decode and FID: bench/gpu-fid.sh). Prepare with `make devbin` and checkouts of the two
# references in the ignored .ref/ (see bench/gpu-bench.sh); run `bash bench/gpu-session.sh` there
# with .devbin and .ref carried. JSON lands in $OUT; `python3 bench/ratios.py $OUT` prints the
# same-call ratios. As one command: `bash bench/gpu-session.sh; bash bench/gpu-fid.sh;
# python3 bench/ratios.py $OUT` fits one call (about 8 minutes; each step has its own timeout,
# most important first).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mfr-bench}; mkdir -p "$OUT"
TL=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
export LD_LIBRARY_PATH=$TL PYTHONUNBUFFERED=1
MFR=.devbin/mfr
B4=(--model SiT-B/4 --batch 256 --device cuda --omega 3)
ours() {
  local name=$1 limit=$2; shift 2; echo "## ours $name"
  timeout "$limit" $MFR bench train "$@" --json "$OUT/$name.json" 2>&1 | grep -E '^error' 
  python3 - "$OUT/$name.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit("no result")
o = r["ops"]
print(f'{r["ms_per_step"]:.1f} ms/step, {r["img_per_s"]:.0f} img/s, {r["peak_memory_gib"]:.1f} GiB, {r["compute_dtype"]}; '
      f'{o["kernels"]} kernels, {o["gb_moved"]:.1f} GB, {o["tflop"]:.2f} TFLOP per step; '
      f'vs forward AD {r["agreement_with_forward_ad"]}; graph vs eager {r.get("graph_vs_eager")}')
print("top ops by bytes:", [(x["op"], x["kernels"], round(x["mb"] / 1e3, 1)) for x in o["top_by_bytes"][:8]])
PY
}
ref() {
  local name=$1 limit=$2; shift 2; echo "## $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  grep '^{' "$OUT/$name.log" | tee "$OUT/$name.txt"; grep -m3 -iE 'error|Traceback' "$OUT/$name.log"
}
ours b4-bf16 90 "${B4[@]}" --precision bf16
ours b4-bf16-graph 120 "${B4[@]}" --precision bf16 --cuda-graph
ref port-b4-bf16 90 env MEANFLOW_REF=.ref/MeanFlow-PyTorch python3 .devbin/reference_step.py --model SiT-B/4 --batch 256 --omega 3.0
ref jax 200 env MEANFLOW_JAX_REF=.ref/meanflow-jax XLA_PYTHON_CLIENT_PREALLOCATE=false python3 .devbin/reference_jax.py
ours b4-tf32-graph 90 "${B4[@]}" --precision tf32 --cuda-graph
ref port-b4-fp32 90 env MEANFLOW_REF=.ref/MeanFlow-PyTorch python3 .devbin/reference_step.py --model SiT-B/4 --batch 256 --omega 3.0 --fp32
XL2=(--model SiT-XL/2 --batch 32 --device cuda --omega 0.2 --kappa 0.92 --steps 6 --precision bf16)
ours xl2-bf16 120 "${XL2[@]}"
ours xl2-bf16-graph 120 "${XL2[@]}" --cuda-graph
