#!/usr/bin/env bash
# One call on a GPU machine: the NCCL path of data-parallel training. A world of one process
# (torchrun's variables, and `mfr launch --nproc 1`) must train as a plain run does; with two or
# more GPUs, `mfr launch` over all of them must too (to rounding). Prepare with `make devbin`;
# run `bash bench/gpu-dist.sh` there with .devbin carried. JSON and logs land in $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mfr-dist}; mkdir -p "$OUT"
TL=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export LD_LIBRARY_PATH=$TL PYTHONUNBUFFERED=1 MFR_DIST_TIMEOUT=120
MFR=.devbin/mfr
GPUS=$(nvidia-smi -L | wc -l)
python3 bench/make-latents.py /tmp/b4-latents 1024
SETS=(--set train.precision=f32 --set train.epochs=2 --set train.checkpoint_every=4 --set train.log_every=1)
run() { local name=$1; shift; echo "## $name: $*"; ( time timeout 240 "$@" --results "/tmp/$name" ) >"$OUT/$name.log" 2>&1; echo "exit $?"; tail -4 "$OUT/$name.log"; }
run one $MFR train bench/b4-smoke.toml "${SETS[@]}"
run nccl1 env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
  $MFR train bench/b4-smoke.toml "${SETS[@]}"
run launch1 $MFR launch --nproc 1 train bench/b4-smoke.toml "${SETS[@]}"
if [ "$GPUS" -ge 2 ]; then run launchN $MFR launch --nproc "$GPUS" train bench/b4-smoke.toml "${SETS[@]}"; fi
python3 - "$OUT" <<'EOF'
import json, sys, glob, os, torch
from safetensors.torch import load_file
def final(name):
    files = sorted(glob.glob(f"/tmp/{name}/b4-smoke/default/checkpoints/*.safetensors"))
    return load_file(files[-1]) if files else None
def stats(name):
    p = f"/tmp/{name}/b4-smoke/default/stats.jsonl"
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
ref = final("one")
report = {}
for name in ["nccl1", "launch1", "launchN"]:
    got = final(name)
    if got is None or ref is None:
        report[name] = "no checkpoint"
        continue
    err = max(((got[k].double() - ref[k].double()).norm() / ref[k].double().norm().clamp_min(1e-30)).item() for k in ref)
    s = stats(name)
    report[name] = {"max_rel_err_vs_one": err, "losses": [round(x["loss"], 6) for x in s], "img_per_s": [round(x["img_per_s"]) for x in s]}
report["one"] = {"losses": [round(x["loss"], 6) for x in stats("one")], "img_per_s": [round(x["img_per_s"]) for x in stats("one")]}
print(json.dumps(report, indent=1))
json.dump(report, open(os.path.join(sys.argv[1], "dist.json"), "w"), indent=1)
EOF
