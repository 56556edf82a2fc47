#!/usr/bin/env bash
# One call on a GPU machine for the evaluation speed target (docs/PERFORMANCE.md): FID-50K of B/4
# end to end (1-NFE sampling, SD-VAE decode, Inception, distance; random weights) with the decode
# as the sample stage runs it (TF32), then decode throughput in float32, TF32 and bf16 side by
# side. Prepare with `make devbin`; run `bash bench/gpu-fid.sh` there with .devbin carried.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mfr-bench}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu-fid.txt"
MFR=.devbin/mfr
show='"(seconds[a-z_]*|img_per_s|ms_per_batch|peak_memory_gib|fid_between_halves|tflop|gb_moved)"|rror'
echo "## FID-50K, decode tf32"
timeout 330 $MFR bench fid --model SiT-B/4 --num 50000 --batch 500 --decode tf32 --device cuda --json "$OUT/fid50k-tf32.json" 2>&1 | grep -E "$show"
for p in f32 tf32 bf16; do
  echo "## decode $p"
  timeout 60 $MFR bench sample --model SiT-B/4 --batch 256 --precision bf16 --device cuda --batches 2 --decode $p --json "$OUT/decode-$p.json" 2>&1 | grep -E "$show"
done
