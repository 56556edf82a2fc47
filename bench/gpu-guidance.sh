#!/usr/bin/env bash
# One call: steps with kappa > 0 (two guidance velocities, batched into one forward), ours and
# the PyTorch port side by side. Prepare with `make devbin` and a port checkout in .ref/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mfr-bench}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')") PYTHONUNBUFFERED=1
MFR=.devbin/mfr
run() { echo "## $*"; timeout 150 "$@" 2>&1 | grep -E '"(ms_per_step|img_per_s|peak_memory_gib)"|ms_per_step|error'; }
run $MFR bench train --model SiT-B/4 --batch 256 --precision bf16 --device cuda --omega 1 --kappa 0.5 --json "$OUT/ours-b4-k05.json"
run env MEANFLOW_REF=.ref/MeanFlow-PyTorch python3 .devbin/reference_step.py --model SiT-B/4 --batch 256 --omega 1.0 --kappa 0.5
run $MFR bench train --model SiT-XL/2 --batch 32 --precision bf16 --device cuda --omega 0.2 --kappa 0.92 --steps 6 --json "$OUT/ours-xl2.json"
run env MEANFLOW_REF=.ref/MeanFlow-PyTorch python3 .devbin/reference_step.py --model SiT-XL/2 --batch 32 --omega 0.2 --kappa 0.92 --steps 6
