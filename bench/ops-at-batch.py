"""The op profile of a training step at a batch too large for this machine: kernel launches,
bytes and FLOPs are affine in the batch (per-parameter work is fixed, per-sample work scales),
so two small batches give them exactly at any batch.
Usage: python3 bench/ops-at-batch.py SMALL.json LARGE.json [TARGET_BATCH=256]
(the JSON of `mfr bench train ... --json`, same model and settings, two batch sizes)."""
import json, sys

a, b = (json.load(open(p)) for p in sys.argv[1:3])
target = int(sys.argv[3]) if len(sys.argv) > 3 else 256
ba, bb = a["batch"], b["batch"]


def at(va, vb):
    return va + (vb - va) / (bb - ba) * (target - ba)


total = {k: round(at(a["ops"][k], b["ops"][k]), 3) for k in ["kernels", "dispatches", "gb_moved", "tflop"]}
print(json.dumps(dict(model=b["model"], precision=b["precision"], batch=target, **total)))
rows_a = {r["op"]: r for r in a["ops"]["top_by_bytes"]}
for r in b["ops"]["top_by_bytes"]:
    if r["op"] in rows_a:
        gb = at(rows_a[r["op"]]["mb"], r["mb"]) / 1e3
        print(f'{r["op"]:<60} {r["kernels"]:>5} kernels {gb:9.2f} GB')
