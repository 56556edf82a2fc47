#!/usr/bin/env bash
# One call on a GPU machine: our training step and the PyTorch port's side by side on one card
# (bf16 and fp32/TF32), XL/2, then a real `mfr run` of B/4 on synthetic latents.
# Prepare on the build machine with `make devbin` (binary + the shared reference scripts into the
# ignored .devbin/) and a checkout of HaoyiZhu/MeanFlow-PyTorch in the ignored .ref/; then run
# `bash bench/gpu-bench.sh` there with .devbin and .ref carried. JSON lands in $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mfr-bench}; mkdir -p "$OUT"
TL=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
export LD_LIBRARY_PATH=$TL PYTHONUNBUFFERED=1
MFR=.devbin/mfr
run() { echo "## $*"; timeout 150 "$@" 2>&1 | tail -25; }
python3 bench/make-latents.py /tmp/b4-latents 1536 &
run $MFR bench train --model SiT-B/4 --batch 256 --precision bf16 --device cuda --omega 3 --json "$OUT/ours-b4-bf16.json"
run $MFR bench train --model SiT-B/4 --batch 256 --precision bf16 --device cuda --omega 3 --jvp forward-ad --json "$OUT/ours-b4-bf16-fwad.json"
run env MEANFLOW_REF=.ref/MeanFlow-PyTorch python3 .devbin/reference_step.py --model SiT-B/4 --batch 256 --omega 3.0
run $MFR bench train --model SiT-B/4 --batch 256 --precision tf32 --device cuda --omega 3 --json "$OUT/ours-b4-tf32.json"
run env MEANFLOW_REF=.ref/MeanFlow-PyTorch python3 .devbin/reference_step.py --model SiT-B/4 --batch 256 --omega 3.0 --fp32
run $MFR bench train --model SiT-XL/2 --batch 32 --precision bf16 --device cuda --omega 0.2 --kappa 0.92 --steps 6 --json "$OUT/ours-xl2-bf16.json"
wait
echo "## mfr run bench/b4-smoke.toml"
( time timeout 200 $MFR run bench/b4-smoke.toml --results /tmp/res ) 2>&1 | tail -15
cp /tmp/res/b4-smoke/default/stats.jsonl "$OUT/b4-smoke-stats.jsonl"
cat /tmp/res/b4-smoke/default/stats.jsonl
