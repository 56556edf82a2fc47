#!/usr/bin/env bash
# One call on a GPU machine: 1-NFE sampling and Inception throughput (random weights: timing only).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mfr-bench}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
MFR=.devbin/mfr
run() { echo "## $*"; timeout 150 "$@" 2>&1 | grep -E '"(what|batch|precision|ms_per_batch|img_per_s|peak_memory_gib)"|error'; }
run $MFR bench sample --model SiT-B/4 --batch 1024 --precision bf16 --device cuda --json "$OUT/sample-b4.json"
run $MFR bench sample --model SiT-XL/2 --batch 256 --precision bf16 --device cuda --json "$OUT/sample-xl2.json"
run $MFR bench evaluate --batch 250 --precision f32 --device cuda --json "$OUT/inception-f32.json"
run $MFR bench evaluate --batch 250 --precision tf32 --device cuda --json "$OUT/inception-tf32.json"
run $MFR bench evaluate --batch 250 --precision bf16 --device cuda --json "$OUT/inception-bf16.json"
