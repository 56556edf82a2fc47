#!/usr/bin/env python3
"""Write a tiny checkpoint in the official JAX MeanFlow on-disk format, plus golden values.

The official network and MeanFlow module are IMPORTED from a checkout of Gsunshine/meanflow named by
the environment variable MEANFLOW_JAX_REF; nothing of it is copied here. The train state is built
the way the official train.py builds it (a flax TrainState subclass with an `ema_params` field,
optax.adamw(1e-4, weight_decay=0, b2=0.95)) and written with the official helper
utils/ckpt_util.save_checkpoint (replicated state -> x[0] -> device_get ->
flax.training.checkpoints.save_checkpoint_multiprocess(workdir, state, step, keep=3)).

Usage:
    MEANFLOW_JAX_REF=/path/to/meanflow python tools/make_flax_checkpoint.py OUT_DIR [--layout L]

--layout auto (default) picks what the installed libraries write:
    msgpack  orbax-checkpoint < 0.5 (official pin 0.4.4): OUT_DIR/msgpack/checkpoint_<step>/checkpoint
    ocdbt    orbax-checkpoint >= 0.5: OUT_DIR/ocdbt/checkpoint_<step>/{manifest.ocdbt, d/, ...}
    legacy   flax's own msgpack writer (flax_use_orbax_checkpointing=False):
             OUT_DIR/legacy/checkpoint_<step> (a single file)
The layout actually found on disk is checked against the name; a mismatch is an error.

OUT_DIR/expected.safetensors (written by the first run, checked by later runs with other library
versions; --write-expected rewrites it) holds the fixed input, the official network's output for
the EMA and the non-EMA parameters, and every EMA parameter (`ema.<flax path>`).
"""
import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import numpy as np

REF = os.environ.get("MEANFLOW_JAX_REF")
if not REF:
    sys.exit("set MEANFLOW_JAX_REF to a checkout of Gsunshine/meanflow")
sys.path.insert(0, os.path.abspath(REF))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax  # noqa: E402
import optax  # noqa: E402
from flax import jax_utils, traverse_util  # noqa: E402
from flax.training import checkpoints, train_state  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

# Official code (imported, unchanged).
from models import models_dit  # noqa: E402
import meanflow as official_meanflow  # noqa: E402
from utils import ckpt_util as official_ckpt_util  # noqa: E402

STEP = 1234
MODEL_STR = "MFR_Tiny"  # name under which the tiny factory is registered in models_dit


def versions():
    out = {"python": sys.version.split()[0]}
    import importlib.metadata as md
    for name in ["jax", "jaxlib", "flax", "orbax-checkpoint", "optax", "numpy", "msgpack",
                 "tensorstore", "safetensors"]:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def official_commit():
    c = os.environ.get("MEANFLOW_JAX_COMMIT")
    if c:
        return c
    try:
        return subprocess.check_output(["git", "-C", REF, "rev-parse", "HEAD"], text=True).strip()
    except Exception:  # not a git checkout
        return "unknown"


def flat(tree):
    return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def perturb(params, seed, scale=0.05):
    """p + scale * N(0, 1), one key per parameter (fold_in(PRNGKey(seed), index in sorted order))."""
    f = flat(params)
    base = jax.random.PRNGKey(seed)
    out = {}
    for i, k in enumerate(sorted(f)):
        p = f[k]
        out[k] = p + scale * jax.random.normal(jax.random.fold_in(base, i), p.shape, p.dtype)
    return traverse_util.unflatten_dict(out, sep="/")


class TrainState(train_state.TrainState):
    ema_params: Any


def orbax_version():
    import importlib.metadata as md
    try:
        return tuple(int(x) for x in md.version("orbax-checkpoint").split(".")[:2])
    except md.PackageNotFoundError:
        return None


def pick_layout(arg):
    if arg != "auto":
        return arg
    v = orbax_version()
    if v is None:
        return "legacy"
    return "msgpack" if v < (0, 5) else "ocdbt"


def detect_layout(ckpt):
    if os.path.isfile(ckpt):
        return "legacy"
    names = set(os.listdir(ckpt))
    if "manifest.ocdbt" in names:
        return "ocdbt"
    if "checkpoint" in names:
        return "msgpack"
    return "unknown:" + ",".join(sorted(names))


def tree_equal_bits(a, b):
    fa, fb = flat(a), flat(b)
    if set(fa) != set(fb):
        return False, "keys differ: %s" % sorted(set(fa) ^ set(fb))
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
            return False, k
    return True, ""


def describe_msgpack(path):
    """Structure of a flax/orbax msgpack file, read with the plain msgpack package."""
    import msgpack
    codes = {}

    def ext_hook(code, data):
        codes[code] = codes.get(code, 0) + 1
        inner = msgpack.unpackb(data, raw=False)
        if code == 1:  # (shape, dtype name, raw bytes)
            return {"__ext": 1, "shape": list(inner[0]), "dtype": inner[1], "nbytes": len(inner[2])}
        if code == 3:  # (dtype name, raw bytes)
            return {"__ext": 3, "dtype": inner[0], "nbytes": len(inner[1])}
        return {"__ext": code, "inner_type": type(inner).__name__}

    with open(path, "rb") as fh:
        obj = msgpack.unpackb(fh.read(), ext_hook=ext_hook, raw=False, strict_map_key=False)

    def summarize(o, depth=0):
        if isinstance(o, dict) and "__ext" in o:
            return o
        if isinstance(o, dict):
            if depth >= 3:
                return {"map_keys": sorted(map(str, o))}
            return {str(k): summarize(v, depth + 1) for k, v in o.items()}
        if isinstance(o, list):
            return {"array_len": len(o), "items": [summarize(v, depth + 1) for v in o[:3]]}
        return {"python": type(o).__name__, "value": o if not isinstance(o, bytes) else len(o)}

    s = summarize(obj)
    ema = obj["ema_params"]["net"] if isinstance(obj.get("ema_params"), dict) else None
    return {"top_type": type(obj).__name__, "top_keys": list(obj) if isinstance(obj, dict) else None,
            "ext_codes": codes, "tree": {k: s[k] for k in ("step", "opt_state")},
            "ema_net_keys": sorted(ema) if ema else None,
            "sample_leaf": (obj["ema_params"]["net"]["x_embedder"]["proj"]["kernel"] if ema else None)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--layout", default="auto", choices=["auto", "msgpack", "ocdbt", "legacy"])
    ap.add_argument("--write-expected", action="store_true",
                    help="rewrite OUT_DIR/expected.safetensors even if it exists")
    ap.add_argument("--hidden-size", type=int, default=32)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=2)
    args = ap.parse_args()

    layout = pick_layout(args.layout)
    if layout == "legacy":
        flax.config.update("flax_use_orbax_checkpointing", False)
    elif not flax.config.flax_use_orbax_checkpointing:
        flax.config.update("flax_use_orbax_checkpointing", True)

    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=args.hidden_size,
               depth=args.depth, num_heads=args.num_heads, num_classes=10, learn_sigma=False)
    # Register a tiny factory next to the official DiT_* partials, then let the official MeanFlow
    # build its network from it exactly as it does for DiT_B_4: net_fn(name="net",
    # class_dropout_prob=0.0).
    setattr(models_dit, MODEL_STR, functools.partial(models_dit.DiT, **cfg))
    assert official_meanflow.models_dit is models_dit
    model = official_meanflow.MeanFlow(model_str=MODEL_STR, model_config={},
                                       num_classes=cfg["num_classes"])

    # Init as the official train.py `initialized` does (jit(model.init), ones inputs, int t/y).
    x0 = jnp.ones((1, cfg["input_size"], cfg["input_size"], cfg["in_channels"]))
    t0 = jnp.ones((1,), dtype=int)
    y0 = jnp.ones((1,), dtype=int)
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, x0, t0, y0)
    assert list(variables) == ["params"], list(variables)
    init_params = flax.core.unfreeze(variables["params"])
    assert list(init_params) == ["net"], list(init_params)

    params = perturb(init_params, seed=100)
    ema_params = perturb(init_params, seed=200)
    for name, tree in (("params", params), ("ema_params", ema_params)):
        for k, v in flat(tree).items():
            assert np.all(np.asarray(v) != 0), (name, k)

    tx = optax.adamw(learning_rate=1e-4, weight_decay=0, b2=0.95)
    state = TrainState.create(apply_fn=functools.partial(model.apply, method=model.forward),
                              params=params, ema_params=ema_params, tx=tx)
    state = state.replace(step=STEP)

    # Save with the official helper, from a replicated state as in train.py.
    workdir = os.path.abspath(os.path.join(args.out_dir, layout))
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    official_ckpt_util.save_checkpoint(jax_utils.replicate(state), workdir)
    ckpt = os.path.join(workdir, "checkpoint_%d" % STEP)
    found = detect_layout(ckpt)
    if found != layout:
        raise SystemExit("asked for layout %s but the libraries wrote %s" % (layout, found))

    # Self-check: restore without a target (raw state dict) and compare bit for bit.
    raw = checkpoints.restore_checkpoint(workdir, target=None)
    assert sorted(raw) == ["ema_params", "opt_state", "params", "step"], sorted(raw)
    assert int(np.asarray(raw["step"])) == STEP
    ok, why = tree_equal_bits(raw["params"], params)
    assert ok, why
    ok, why = tree_equal_bits(raw["ema_params"], ema_params)
    assert ok, why
    restored = official_ckpt_util.restore_checkpoint(
        TrainState.create(apply_fn=None, params=init_params, ema_params=init_params, tx=tx), workdir)
    assert int(restored.step) == STEP
    ok, why = tree_equal_bits(restored.ema_params, ema_params)
    assert ok, why

    # The official network output, through the official MeanFlow.u_fn (as solver_step calls it).
    x = jax.random.normal(jax.random.PRNGKey(1), (3, cfg["input_size"], cfg["input_size"],
                                                   cfg["in_channels"]), jnp.float32)
    t = jnp.array([0.9, 0.5, 0.2], jnp.float32)
    r = jnp.array([0.3, 0.5, 0.1], jnp.float32)
    h = t - r
    y = jnp.array([1, cfg["num_classes"], 7], jnp.int32)  # 10 = null label

    def u_of(p):
        return model.apply({"params": p}, x, t=t, h=h, y=y, train=False,
                           method=official_meanflow.MeanFlow.u_fn, rngs={"gen": jax.random.PRNGKey(2)})

    u = np.asarray(jax.jit(u_of)(restored.ema_params))
    u_params = np.asarray(jax.jit(u_of)(restored.params))
    u_eager = np.asarray(u_of(restored.ema_params))
    # Same network called directly (DiT.__call__), to pin the call signature.
    net = getattr(models_dit, MODEL_STR)(name="net", class_dropout_prob=0.0)
    u_direct = np.asarray(jax.jit(lambda p: net.apply({"params": p}, x, t, h, y, train=False,
                                                      key=jax.random.PRNGKey(2)))(ema_params["net"]))
    rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    checks = {"u_jit_vs_eager_maxrel": rel(u_eager, u), "u_direct_vs_u_fn_maxrel": rel(u_direct, u),
              "u_params_vs_u_ema_maxrel": rel(u_params, u), "u_rms": float(np.sqrt(np.mean(u ** 2)))}
    assert checks["u_jit_vs_eager_maxrel"] < 1e-5 and checks["u_direct_vs_u_fn_maxrel"] < 1e-5
    assert checks["u_params_vs_u_ema_maxrel"] > 1e-2

    info = {"layout": layout, "checkpoint": os.path.relpath(ckpt, args.out_dir), "versions": versions(),
            "official_commit": official_commit(), "checks": checks,
            "files": sorted(os.path.relpath(os.path.join(d, f), workdir)
                            for d, _, fs in os.walk(workdir) for f in fs)}
    if layout in ("msgpack", "legacy"):
        info["msgpack"] = describe_msgpack(ckpt if layout == "legacy" else os.path.join(ckpt, "checkpoint"))

    exp_path = os.path.join(args.out_dir, "expected.safetensors")
    tensors = {"x": np.asarray(x), "t": np.asarray(t), "r": np.asarray(r), "h": np.asarray(h),
               "y": np.asarray(y).astype(np.int64), "u": u, "u_params": u_params}
    for k, v in flat(ema_params).items():
        tensors["ema." + k] = np.asarray(v)
    if args.write_expected or not os.path.exists(exp_path):
        meta = {
            "model": json.dumps(cfg), "step": str(STEP), "official_commit": official_commit(),
            "versions": json.dumps(versions()),
            "u_call": "MeanFlow(model_str=<tiny DiT partial>, model_config={}, num_classes=10)"
                      ".apply({'params': ema_params}, x, t=t, h=h, y=y, train=False, "
                      "method=MeanFlow.u_fn, rngs={'gen': PRNGKey(2)}) under jax.jit; "
                      "= DiT(name='net', class_dropout_prob=0.0).apply({'params': ema_params['net']}, "
                      "x, t, h, y, train=False, key=...)",
            "layout": "x, u, u_params NHWC (B,H,W,C) float32; t, r, h (B,) float32 with h = t - r "
                      "in float32; y (B,) int64, 10 = null; ema.<flax path> float32 in flax layout",
            "perturbation": "init = official MeanFlow.init({'params': PRNGKey(0)}) under jit; "
                            "params = init + 0.05 N(0,1) with key fold_in(PRNGKey(100), i), "
                            "ema_params the same with PRNGKey(200), i = index of the '/'-joined "
                            "path in sorted order",
            "checks": json.dumps(checks),
        }
        save_file(tensors, exp_path, metadata=meta)
        os.chmod(exp_path, 0o644)
        info["expected"] = "written"
    else:
        old = load_file(exp_path)
        assert set(old) == set(tensors), sorted(set(old) ^ set(tensors))
        cmp = {}
        for k, v in tensors.items():
            o = old[k]
            assert o.shape == v.shape and o.dtype == v.dtype, k
            if k.startswith("u"):
                cmp[k + "_maxrel_vs_file"] = rel(v, o)
                assert cmp[k + "_maxrel_vs_file"] < 1e-5, k
            else:
                assert o.tobytes() == v.tobytes(), k
        info["expected"] = "checked: inputs and ema.* bit-identical; " + json.dumps(cmp)
    print(json.dumps(info, indent=1, default=str))


if __name__ == "__main__":
    main()
