#!/usr/bin/env python3
"""Write tiny checkpoints in the official improved-MeanFlow (iMF) on-disk format, plus golden values.

The official code is IMPORTED from a checkout of Lyy-iiis/imeanflow named by MEANFLOW_IMF_REF
(tools/imf_official.py; nothing of it is copied). A tiny imfDiT preset is registered beside the
official ones and the official iMeanFlow builds it by name. Train states are built by the official
utils/trainstate_util.create_train_state (a flax TrainState with `ema_params`, optax.adamw with
configs/default.py's b2 0.95) and written by the official utils/ckpt_util.save_checkpoint
(replicated state -> x[0] -> device_get -> flax save_checkpoint_multiprocess(workdir, state, step,
keep=3)), as train.py does:
  full       the training model (eval=False: u-head and v-head blocks), params and EMA perturbed
             (below), one AdamW update applied so mu, nu and count are not the initial ones.
  inference  the evaluation model (eval=True: no v-head blocks; the v-head's final layer is still
             there), as train.just_evaluate builds it: its TrainState from create_train_state,
             params and EMA those of `full` without the v_heads_* blocks, a fresh AdamW state.
             (How the released iMF-*-2.zip were made is not published; this is the state the
             official evaluation restores without complaint, and the check below restores it so.)

Usage:
    MEANFLOW_IMF_REF=/path/to/imeanflow python tools/make_imf_checkpoint.py OUT_DIR

Writes, for each variant V in (full, inference):
    OUT_DIR/orbax/V/checkpoint_<step>/...   what the installed flax + orbax write (with the
                                            official pin orbax-checkpoint 0.6.4: OCDBT); kept
                                            for V = inference only
    OUT_DIR/legacy/V/checkpoint_<step>      flax's own msgpack writer (flax_use_orbax_checkpointing
                                            off) through the same official save_checkpoint
    OUT_DIR/msgpack/V.msgpack               the orbax checkpoint exported by tools/export_orbax.py
                                            (what `make flax-export` does for a user)
and OUT_DIR/expected.safetensors: the inputs, the official network's u and v on the EMA weights
and the official `generate` at 1 and 2 NFE, once in float32 as the official code runs (jit) and
once in float64 (`--float64`, a second process: x64 and tools/imf_official.use_float64) on the
same float32 weights, plus every EMA parameter of `full` (`ema.<flax path>`).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

import imf_official as official
from imf_official import ckpt_util, imf, imfDiT, jax, jnp, trainstate_util

import flax  # noqa: E402
from flax import jax_utils, traverse_util  # noqa: E402
from flax.training import checkpoints  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

STEP = 2345
MODEL_STR = "imfDiT_MFR_Tiny"
SHAPE = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=16, depth=3, num_heads=2,
             aux_head_depth=2)
NUM_CLASSES = 10
# The conditioning of the golden calls: three rows, one with the null label (10).
X_KEY, GEN_KEY = 1, 3
T = [0.9, 0.5, 0.7]
R = [0.3, 0.5, 0.1]
OMEGA = [1.0, 3.5, 7.25]
T_MIN = [0.0, 0.25, 0.4]
T_MAX = [1.0, 0.75, 0.6]
Y = [1, NUM_CLASSES, 7]
# The sampler's settings (B/2's released ones) and batch.
GEN = dict(omega=8.0, t_min=0.4, t_max=0.65, n=4)


def flat(tree):
    return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def unflat(d):
    return traverse_util.unflatten_dict(d, sep="/")


def config():
    c = official.default_config.get_config()
    c.dataset.image_size = SHAPE["input_size"]
    c.dataset.image_channels = SHAPE["in_channels"]
    c.dataset.num_classes = NUM_CLASSES
    return c


def model(cls, eval_mode):
    official.register(MODEL_STR, **SHAPE)
    return cls(model_str=MODEL_STR, num_classes=NUM_CLASSES, eval=eval_mode)


def train_state(m):
    """The official create_train_state (jit init of iMeanFlow, adamw) for model m."""
    lr_fn = lambda step: 1e-4  # noqa: E731 (configs/default.py: constant 1e-4 without warmup)
    return trainstate_util.create_train_state(jax.random.PRNGKey(0), config(), m,
                                              SHAPE["input_size"], lr_fn)


def without_v_heads(params):
    return unflat({k: v for k, v in flat(params).items() if "/v_heads_" not in k})


def states():
    """(full, inference) train states, step STEP."""
    full = train_state(model(imf.iMeanFlow, False))
    params = official.perturb(full.params, 100, SHAPE["hidden_size"])
    ema = official.perturb(full.params, 200, SHAPE["hidden_size"])
    full = full.replace(params=params, ema_params=ema)
    grads = unflat({k: 0.01 * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(300), i),
                                                v.shape, v.dtype)
                    for i, (k, v) in enumerate(sorted(flat(params).items()))})
    full = full.apply_gradients(grads=grads).replace(step=STEP)
    inference = train_state(model(imf.iMeanFlow, True))
    assert set(flat(inference.params)) == set(flat(without_v_heads(full.params)))
    inference = inference.replace(params=without_v_heads(full.params),
                                  ema_params=without_v_heads(full.ema_params), step=STEP)
    return full, inference


def same_bits(a, b):
    fa, fb = flat(a), flat(b)
    assert set(fa) == set(fb), sorted(set(fa) ^ set(fb))
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes(), k


def save(state, workdir, legacy):
    """The official save_checkpoint, with flax's own msgpack writer when `legacy`."""
    flax.config.update("flax_use_orbax_checkpointing", not legacy)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    ckpt_util.save_checkpoint(jax_utils.replicate(state), workdir)
    raw = checkpoints.restore_checkpoint(workdir, target=None)
    assert sorted(raw) == ["ema_params", "opt_state", "params", "step"], sorted(raw)
    assert int(np.asarray(raw["step"])) == STEP
    same_bits(raw["params"], state.params)
    same_bits(raw["ema_params"], state.ema_params)
    return os.path.join(workdir, "checkpoint_%d" % STEP)


def layout_of(ckpt):
    if os.path.isfile(ckpt):
        return "msgpack file"
    names = set(os.listdir(ckpt))
    return "ocdbt" if "manifest.ocdbt" in names else ("msgpack" if "checkpoint" in names
                                                       else ",".join(sorted(names)))


def restore_into(workdir, eval_mode):
    """What the official just_evaluate (eval_mode) or a resumed training does with a checkpoint
    folder: a train state of that model restored from it with the official restore_checkpoint.
    Says how many v-head blocks the restored params hold, or the error's first line."""
    flax.config.update("flax_use_orbax_checkpointing", True)
    try:
        target = train_state(model(imf.iMeanFlow, eval_mode))
        restored = ckpt_util.restore_checkpoint(target, workdir)
        blocks = {k.split("/")[1] for k in flat(restored.params) if "/v_heads_" in k}
        return "restored, %d v-head blocks" % len(blocks)
    except Exception as e:  # noqa: BLE001 (reported, not hidden)
        return "error: " + str(e).splitlines()[0][:300]


def goldens(cls, full_ema, inference_ema, dtype):
    """u, v of the full network and u of the inference network on the fixed inputs; `generate`
    of the inference network at 1 and 2 NFE (and its noise and labels, as generate draws them:
    split(key, 3) -> normal from the second, randint from the third)."""
    cast = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)  # noqa
    full_ema, inference_ema = cast(full_ema), cast(inference_ema)
    s = SHAPE["input_size"]
    x = jax.random.normal(jax.random.PRNGKey(X_KEY), (3, s, s, SHAPE["in_channels"]), jnp.float32)
    arr = lambda v: jnp.asarray(v, jnp.float32).astype(dtype)  # noqa: E731
    x, t, r, omega, t_min, t_max = (x.astype(dtype), arr(T), arr(R), arr(OMEGA), arr(T_MIN),
                                    arr(T_MAX))
    h = t - r
    y = jnp.asarray(Y, jnp.int32)
    full, inference = model(cls, False), model(cls, True)

    def call(m, params, *a):
        return m.apply({"params": params}, *a, method=imf.iMeanFlow.u_fn)

    u, v = jax.jit(lambda p: call(full, p, x, t, h, omega, t_min, t_max, y))(full_ema)
    u_eval = jax.jit(lambda p: call(inference, p, x, t, h, omega, t_min, t_max, y)[0])(inference_ema)
    out = {"x": x, "t": t, "r": r, "h": h, "omega": omega, "t_min": t_min, "t_max": t_max,
           "y": y.astype(jnp.int64) if dtype == jnp.float64 else y, "u": u, "v": v,
           "u_inference": u_eval}
    c = config()
    key = jax.random.PRNGKey(GEN_KEY)
    _, k_noise, k_labels = jax.random.split(key, 3)
    n = GEN["n"]
    out["gen_noise"] = jax.random.normal(k_noise, (n, s, s, SHAPE["in_channels"]), inference.dtype)
    out["gen_labels"] = jax.random.randint(k_labels, (n,), 0, NUM_CLASSES)
    for steps in (1, 2):
        out["gen_sample_%dnfe" % steps] = imf.generate(
            {"params": inference_ema}, inference, key, n, c, steps,
            GEN["omega"], GEN["t_min"], GEN["t_max"])
    # generate's own draws: its 1-NFE sample is noise - u(noise, h = 1).
    ones = jnp.ones((n,), dtype)
    g = lambda v: ones * jnp.asarray(v, dtype)  # noqa: E731
    u_noise = call(inference, inference_ema, out["gen_noise"], ones, ones, g(GEN["omega"]),
                   g(GEN["t_min"]), g(GEN["t_max"]), out["gen_labels"])[0]
    direct = out["gen_noise"] - u_noise
    rel = float(jnp.max(jnp.abs(direct - out["gen_sample_1nfe"])) /
                jnp.max(jnp.abs(out["gen_sample_1nfe"])))
    assert rel < (1e-5 if dtype == jnp.float32 else 1e-13), rel
    out = {k: np.asarray(v) for k, v in out.items()}
    out["gen_labels"] = out["gen_labels"].astype(np.int64)
    out["y"] = out["y"].astype(np.int64)
    return out, {"generate_1nfe_vs_noise_minus_u_maxrel": rel,
                 "u_eval_model_vs_train_model_maxrel": float(
                     np.max(np.abs(out["u_inference"] - out["u"])) / np.max(np.abs(out["u"])))}


def float64_goldens(out_dir):
    """The --float64 process: goldens from the saved legacy checkpoints' EMA in float64."""
    cls = official.use_float64()
    full = checkpoints.restore_checkpoint(os.path.join(out_dir, "legacy", "full"), target=None)
    inference = checkpoints.restore_checkpoint(os.path.join(out_dir, "legacy", "inference"),
                                               target=None)
    g, checks = goldens(cls, full["ema_params"], inference["ema_params"], jnp.float64)
    np.savez(os.path.join(out_dir, "float64.npz"), **g)
    print(json.dumps(checks))


def export(ckpt, out):
    tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_orbax.py")
    subprocess.run([sys.executable, tool, ckpt, out], check=True, stdout=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--float64", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out_dir = os.path.abspath(args.out_dir)
    if args.float64:
        return float64_goldens(out_dir)

    full, inference = states()
    info = {"official_commit": official.commit(), "official_sha256": official.file_hashes(),
            "versions": official.versions(), "step": STEP, "shape": SHAPE,
            "num_classes": NUM_CLASSES, "checkpoints": {}}
    for name, state in (("full", full), ("inference", inference)):
        orbax_ckpt = save(state, os.path.join(out_dir, "orbax", name), legacy=False)
        legacy_ckpt = save(state, os.path.join(out_dir, "legacy", name), legacy=True)
        os.makedirs(os.path.join(out_dir, "msgpack"), exist_ok=True)
        exported = os.path.join(out_dir, "msgpack", name + ".msgpack")
        export(orbax_ckpt, exported)
        info["checkpoints"][name] = {
            "orbax": layout_of(orbax_ckpt), "legacy": layout_of(legacy_ckpt),
            "parameters": int(sum(np.size(v) for v in flat(state.params).values())),
            "into_the_evaluation_model": restore_into(os.path.join(out_dir, "orbax", name), True),
            "into_the_training_model": restore_into(os.path.join(out_dir, "orbax", name), False),
        }
        if name == "full":
            # Only the inference checkpoint's orbax form is kept (the import test needs one
            # OCDBT checkpoint to refuse); the full one lives on as its msgpack export.
            shutil.rmtree(os.path.join(out_dir, "orbax", name))
    assert info["checkpoints"]["inference"]["into_the_evaluation_model"].startswith("restored"), info

    f32, checks32 = goldens(imf.iMeanFlow, full.ema_params, inference.ema_params, jnp.float32)
    run = subprocess.run([sys.executable, os.path.abspath(__file__), out_dir, "--float64"],
                         check=True, capture_output=True, text=True)
    checks64 = json.loads(run.stdout.strip().splitlines()[-1])
    f64 = dict(np.load(os.path.join(out_dir, "float64.npz")))
    os.remove(os.path.join(out_dir, "float64.npz"))
    for k in ("x", "t", "r", "omega", "t_min", "t_max"):
        assert np.array_equal(f64[k], f32[k].astype(np.float64)), k
    tensors = {"f32." + k: v for k, v in f32.items()}
    tensors.update({"f64." + k: v for k, v in f64.items()
                    if k not in ("x", "t", "r", "omega", "t_min", "t_max", "y")})
    for k, v in flat(full.ema_params).items():
        tensors["ema." + k] = np.asarray(v)
    rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))  # noqa: E731
    info["checks"] = {"float32": checks32, "float64": checks64,
                      "u_float32_vs_float64_maxrel": rel(f32["u"], f64["u"]),
                      "v_float32_vs_float64_maxrel": rel(f32["v"], f64["v"]),
                      "u_rms": float(np.sqrt(np.mean(f64["u"] ** 2))),
                      "v_rms": float(np.sqrt(np.mean(f64["v"] ** 2)))}
    meta = {
        "info": json.dumps(info, default=str),
        "layout": "images NHWC; f32.* as the official code computes them (float32, jit), f64.* "
                  "from the same float32 weights in float64 (x64, float32 names read as float64 "
                  "in imf.py, models/embedder.py, models/imfDiT.py); x, t, r, omega, t_min, t_max, "
                  "y under f32.* only (the float64 ones are these, widened); h = t - r in each "
                  "dtype; "
                  "u, v = iMeanFlow.u_fn of the full model on the EMA weights, u_inference the "
                  "same call of the inference model; gen_* = imf.generate(params=inference EMA, "
                  "key=PRNGKey(%d), n=%d, omega=%g, t_min=%g, t_max=%g, num_steps=1, 2) with "
                  "gen_noise, gen_labels what it draws; ema.<flax path>: the full state's EMA"
                  % (GEN_KEY, GEN["n"], GEN["omega"], GEN["t_min"], GEN["t_max"]),
    }
    save_file(tensors, os.path.join(out_dir, "expected.safetensors"), metadata=meta)
    print(json.dumps(info, indent=1, default=str))


if __name__ == "__main__":
    main()
