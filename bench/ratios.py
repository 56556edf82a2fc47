"""Same-call ratios from a bench/gpu-session.sh output folder: ours against the PyTorch port and
the official JAX code (speed as img/s ratios, memory as peak ratios). Usage: python3 bench/ratios.py OUT"""
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])


def ours(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def lines(name):
    p = out / f"{name}.txt"
    if not p.exists():
        return []
    recs = []
    for line in p.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in recs if "ms_per_step" in r]


def first(recs, **match):
    return next((r for r in recs if all(str(v) in str(r.get(k, "")) for k, v in match.items())), None)


port_bf16 = first(lines("port-b4-bf16"))
port_fp32 = first(lines("port-b4-fp32"))
jax_b4 = first(lines("jax"), model="DiT_B_4", omega=3.0)
jax_xl2 = first(lines("jax"), model="DiT_XL_2")
rows = [
    ("B/4 bf16 eager", ours("b4-bf16"), [("port", port_bf16), ("JAX", jax_b4)]),
    ("B/4 bf16 CUDA graph", ours("b4-bf16-graph"), [("port", port_bf16), ("JAX", jax_b4)]),
    ("B/4 TF32 CUDA graph", ours("b4-tf32-graph"), [("port fp32", port_fp32), ("JAX", jax_b4)]),
    ("XL/2 b32 bf16 eager", ours("xl2-bf16"), [("JAX", jax_xl2)]),
    ("XL/2 b32 bf16 CUDA graph", ours("xl2-bf16-graph"), [("JAX", jax_xl2)]),
]
for label, mine, peers in rows:
    if mine is None:
        print(f"{label}: no result")
        continue
    text = f"{label}: {mine['ms_per_step']:.1f} ms, {mine['peak_memory_gib']:.1f} GiB"
    for name, peer in peers:
        if peer is None:
            text += f"; {name}: no result"
            continue
        speed = peer["ms_per_step"] / mine["ms_per_step"]
        memory = mine["peak_memory_gib"] / peer.get("peak_mem_gib", float("nan"))
        text += f"; vs {name} ({peer['ms_per_step']:.1f} ms): {speed:.2f}x speed, {memory:.2f}x memory"
    agreement = mine.get("agreement_with_forward_ad", {})
    if "within_bf16_tolerance" in agreement:
        verdict = "within" if agreement["within_bf16_tolerance"] else "OUTSIDE"
        text += (f"; vs forward AD du/dt {agreement['du_dt']:.1e}, grads {agreement['grads']:.1e}"
                 f" ({verdict} the bf16 tolerance)")
    if mine.get("graph_vs_eager"):
        text += f"; graph vs eager {mine['graph_vs_eager']}"
    print(text)
