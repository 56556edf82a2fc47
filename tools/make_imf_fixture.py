#!/usr/bin/env python3
"""Write one golden improved-MeanFlow training step in the format of tests/fixtures/imeanflow-jax
(its README), computed by the official code at a geometry of our choosing: the held-out-style
check that nothing in our port is special-cased to the shipped files' sizes.

The official code is IMPORTED from a checkout named by MEANFLOW_IMF_REF (tools/imf_official.py;
nothing of it is copied), run eagerly on the CPU in float64 with the float64 numerics of the
shipped files (imf_official.use_float64). What the official forward computes is recorded, not
recomputed: the draws through pass-through proxies of jax.random in imf.py's namespace; the
guidance velocities, omega, the interval and the dropped labels from the official methods'
return values (flax method interception); u, du/dt and the v-head from its jax.jvp call; the
weights from its stop_gradient calls; the per-row losses from its jnp.sum calls; the loss and the
logged metrics from its return value; the gradients from jax.value_and_grad of it. Only V = u +
(t - r) du/dt is formed here, from the recorded values. The sampler is the official `generate`
(and `sample_one_step` for the state after the first of two steps).

`meta.flax_to_torch` is checked against the official PyTorch port (branch torch, a checkout named
by MEANFLOW_IMF_TORCH_REF) run in the Python named by MEANFLOW_IMF_TORCH_PYTHON (one with torch):
its iMeanFlow's state-dict keys and shapes must be exactly the flax parameters', renamed and
re-laid out.

Usage:
    MEANFLOW_IMF_REF=... MEANFLOW_IMF_TORCH_REF=... MEANFLOW_IMF_TORCH_PYTHON=... \\
        python tools/make_imf_fixture.py OUT.safetensors
"""
import json
import os
import subprocess
import sys

import numpy as np

import imf_official as official
from imf_official import imf, imfDiT, jax

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

iMeanFlow64 = official.use_float64()
jnp = jax.numpy

MODEL_STR = "imfDiT_MFR_Variant"
# Odd batch, patch 1, three heads of 8, 3 + 2 blocks, token counts unlike the defaults.
SHAPE = dict(input_size=4, patch_size=1, in_channels=3, hidden_size=24, depth=5, num_heads=3,
             aux_head_depth=2, num_class_tokens=3, num_time_tokens=2, num_cfg_tokens=5,
             num_interval_tokens=1)
NUM_CLASSES = 7
BATCH = 7
LOSS = dict(P_mean=-0.4, P_std=1.0, data_proportion=0.5, cfg_beta=1.5, class_dropout_prob=0.1,
            norm_p=1.0, norm_eps=0.01)
SAMPLING = dict(omega=3.0, t_min=0.2, t_max=0.9, n_gen=3)
SEED = 5


def flat(tree):
    return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


class Recorder:
    """Pass-through proxies that keep what the official code computed, in call order."""

    def __init__(self):
        self.calls = {}
        self.on = False

    def keep(self, name, value):
        if self.on:
            self.calls.setdefault(name, []).append(value)
        return value

    def proxy(self, target, names):
        rec = self

        class Proxy:
            def __getattr__(self, attr):
                real = getattr(target, attr)
                if attr not in names:
                    return real
                return lambda *a, **k: rec.keep(attr, real(*a, **k))

        return Proxy()


def install(rec):
    """imf.py's jax.random, jax.jvp, jax.lax.stop_gradient and jnp.sum, recorded."""
    real_jax, real_jnp = imf.jax, imf.jnp

    class Jax:
        random = rec.proxy(real_jax.random, {"normal", "uniform"})
        lax = rec.proxy(real_jax.lax, {"stop_gradient"})

        def __getattr__(self, attr):
            if attr == "jvp":
                return lambda *a, **k: rec.keep("jvp", real_jax.jvp(*a, **k))
            return getattr(real_jax, attr)

    class Jnp:
        float32 = real_jnp.float32  # the float64 names of use_float64
        complex64 = real_jnp.complex64

        def __getattr__(self, attr):
            if attr == "sum":
                return lambda *a, **k: rec.keep("sum", real_jnp.sum(*a, **k))
            return getattr(real_jnp, attr)

    imf.jax, imf.jnp = Jax(), Jnp()


def intercept(rec):
    """Return values (and v_cond_fn's omega argument) of the official iMeanFlow methods."""
    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = context.method_name
        if isinstance(context.module, imf.iMeanFlow) and name in (
                "sample_tr", "sample_cfg_interval", "sample_cfg_scale", "v_fn", "v_cond_fn",
                "guidance_fn", "cond_drop"):
            rec.keep(name, out)
            if name == "v_cond_fn":
                rec.keep("v_cond_fn_omega", args[2])
        return out
    return nn.intercept_methods(interceptor)


def torch_port_keys():
    """{state-dict key: shape} of the official PyTorch port's iMeanFlow for this shape."""
    ref, python = os.environ.get("MEANFLOW_IMF_TORCH_REF"), os.environ.get("MEANFLOW_IMF_TORCH_PYTHON")
    if not (ref and python):
        sys.exit("set MEANFLOW_IMF_TORCH_REF (a checkout of imeanflow's branch torch) and "
                 "MEANFLOW_IMF_TORCH_PYTHON (a python with torch)")
    code = (
        "import functools, json, sys; sys.path.insert(0, %r)\n"
        "from models import imfDiT\n"
        "import imf\n"
        "imfDiT.%s = functools.partial(imfDiT.imfDiT, **%r)\n"
        "m = imf.iMeanFlow(%r, img_size=%d, img_channels=%d, num_classes=%d, eval=True)\n"
        "print(json.dumps({k: list(v.shape) for k, v in m.state_dict().items()}))\n"
    ) % (os.path.abspath(ref), MODEL_STR,
         {k: v for k, v in SHAPE.items() if k not in ("input_size", "in_channels")},
         MODEL_STR, SHAPE["input_size"], SHAPE["in_channels"], NUM_CLASSES)
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_name(path, rank):
    """The port's key and layout of a flax path (the rule tests/parity_imf.rs checks ours by)."""
    parts = path.split("/")
    names = []
    for m in parts[:-1]:
        for lst in ("shared_blocks_", "u_heads_", "v_heads_"):
            if m.startswith(lst) and m[len(lst):].isdigit():
                m = lst[:-1] + "." + m[len(lst):]
        if m.startswith("layers_") and m[7:].isdigit():
            m = m[7:]
        names.append(m)
    leaf = parts[-1]
    if leaf == "kernel" and rank == 2:
        return ".".join(names + ["weight"]), "transpose: (in,out) -> (out,in)"
    if leaf == "kernel" and rank == 4:
        return ".".join(names + ["weight"]), "permute(3,2,0,1): HWIO -> OIHW"
    if leaf in ("kernel", "embedding"):
        return ".".join(names + ["weight"]), "none"
    return ".".join(names + [leaf]), "none"


def flax_to_torch(params):
    table = {}
    shapes = {}
    for k, v in flat(params).items():
        key, how = torch_name(k, np.ndim(v))
        table[k] = [key, how]
        s = list(np.shape(v))
        shapes[key] = s[::-1] if how.startswith("transpose") else (
            [s[3], s[2], s[0], s[1]] if how.startswith("permute") else s)
    port = torch_port_keys()
    # The port's eval network has no v-head blocks: the training network's extra keys are those.
    ours = {k: v for k, v in shapes.items() if ".v_heads." not in k}
    assert ours == port, (sorted(set(ours) ^ set(port)),
                          [k for k in ours if k in port and ours[k] != port[k]])
    return table


def main():
    out_path = sys.argv[1]
    official.register(MODEL_STR, **SHAPE)
    model = iMeanFlow64(model_str=MODEL_STR, num_classes=NUM_CLASSES, **LOSS)
    key = jax.random.PRNGKey(SEED)
    s, c = SHAPE["input_size"], SHAPE["in_channels"]
    x0 = jnp.ones((1, s, s, c))
    init = model.init({"params": jax.random.fold_in(key, 0)}, x0, jnp.ones((1,)),
                      jnp.ones((1,), dtype=int))
    params = official.perturb(jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                                     init["params"]), SEED * 100 + 1,
                              SHAPE["hidden_size"])
    k_x, k_y = jax.random.split(jax.random.fold_in(key, 2))
    x = jax.random.normal(k_x, (BATCH, s, s, c), jnp.float64)
    labels = jax.random.randint(k_y, (BATCH,), 0, NUM_CLASSES)
    rec = Recorder()
    install(rec)
    n_fm = int(LOSS["data_proportion"] * BATCH)
    col = lambda a: np.asarray(a).reshape(BATCH)  # noqa: E731  (B,1,1,1) -> (B,)
    # The first 'gen' key of a fixed sequence whose step drops 1 <= num_drop < n_fm labels and
    # puts the r < t rows both inside and outside their guidance intervals.
    for attempt in range(100):
        gen_key = jax.random.fold_in(jax.random.fold_in(key, 4), attempt)

        def forward(p):
            return model.apply({"params": p}, x, labels, method=model.forward,
                               rngs={"gen": gen_key})

        rec.calls = {}
        rec.on = True
        with intercept(rec):
            loss, metrics = forward(params)
        rec.on = False
        r = dict(rec.calls)
        num_drop = int(np.sum(np.asarray(r["uniform"][3]) < LOSS["class_dropout_prob"]))
        t, rr, fm_mask = r["sample_tr"][0]
        t_min, t_max = r["sample_cfg_interval"][0]
        inside = ((np.asarray(t) >= np.asarray(t_min)) & (np.asarray(t) <= np.asarray(t_max)))
        inside = inside.reshape(BATCH)[n_fm:]
        if 1 <= num_drop < n_fm and inside.any() and not inside.all():
            break
    else:
        sys.exit("no 'gen' key of the sequence gives the wanted draws")
    (grad_loss, _), grads = jax.value_and_grad(forward, has_aux=True)(params)
    assert float(grad_loss) == float(loss), (grad_loss, loss)
    t_normal, r_normal, e = r["normal"]
    t_min_draw, t_max_draw, omega_uniform, drop_uniform = r["uniform"]
    t, rr, fm_mask = r["sample_tr"][0]
    t_min, t_max = r["sample_cfg_interval"][0]
    omega = r["sample_cfg_scale"][0]
    v_c_omega, v_u = r["v_fn"][0]
    v_g_guided, v_c = r["guidance_fn"][0]
    omega_masked = r["v_cond_fn_omega"][1]
    y_inp, v_g = r["cond_drop"][0]
    u, du_dt, v_head = r["jvp"][0]
    _, _, loss_u_weight, loss_v_weight = r["stop_gradient"]
    loss_u_per_sample, loss_v_per_sample = [a for a in r["sum"] if np.ndim(a) == 1]
    V = np.asarray(u) + np.asarray(t - rr) * np.asarray(du_dt)

    io = {
        "x": x, "labels": labels, "t_normal": col(t_normal), "r_normal": col(r_normal), "e": e,
        "t": col(t), "r": col(rr), "fm_mask": col(fm_mask).astype(np.int64),
        "t_min_draw": col(t_min_draw), "t_max_draw": col(t_max_draw), "t_min": col(t_min),
        "t_max": col(t_max), "omega_uniform": col(omega_uniform), "omega": col(omega),
        "drop_uniform": np.asarray(drop_uniform), "num_drop": np.array([num_drop]),
        "z_t": (1 - t) * x + t * e, "v_t": e - x, "v_c_omega": v_c_omega, "v_u": v_u,
        "omega_masked": col(omega_masked), "v_c": v_c, "v_g_guided": v_g_guided,
        "y_inp": y_inp, "v_g": v_g, "u": u, "du_dt": du_dt, "v_head": v_head, "V": V,
        "loss_u_per_sample": loss_u_per_sample, "loss_u_weight": col(loss_u_weight),
        "loss_v_per_sample": loss_v_per_sample, "loss_v_weight": col(loss_v_weight),
        "loss": np.array([loss]), "loss_u_mse": np.array([metrics["loss_u"]]),
        "loss_v_mse": np.array([metrics["loss_v"]]),
    }
    tensors = {"io." + k: np.asarray(v) for k, v in io.items()}
    for k in ("labels", "y_inp", "num_drop"):
        tensors["io." + k] = tensors["io." + k].astype(np.int64)
    for k, v in flat(params).items():
        tensors["weights." + k] = np.asarray(v)
    for k, v in flat(grads).items():
        tensors["grad." + k] = np.asarray(v)

    cfg = type("C", (), {})()
    cfg.dataset = type("D", (), dict(num_classes=NUM_CLASSES, image_size=s, image_channels=c))()
    sample_key = jax.random.fold_in(key, 3)
    _, k_noise, k_labels = jax.random.split(sample_key, 3)
    n = SAMPLING["n_gen"]
    noise = jax.random.normal(k_noise, (n, s, s, c), jnp.float64)
    gen_labels = jax.random.randint(k_labels, (n,), 0, NUM_CLASSES)
    gen = {"noise": noise, "labels": gen_labels.astype(np.int64)}
    g = (SAMPLING["omega"], SAMPLING["t_min"], SAMPLING["t_max"])
    for steps in (1, 2):
        gen["sample_%dnfe" % steps] = imf.generate({"params": params}, model, sample_key, n, cfg,
                                                   steps, *g)
    t_steps = jnp.linspace(1.0, 0.0, 3)
    gen["sample_2nfe_step1"] = model.apply({"params": params}, noise, gen_labels, 0, t_steps,
                                           *[jnp.asarray(v) for v in g],
                                           method=model.sample_one_step)
    gen.update(omega=np.array([g[0]]), t_min=np.array([g[1]]), t_max=np.array([g[2]]),
               t_steps_1nfe=np.asarray(jnp.linspace(1.0, 0.0, 2)), t_steps_2nfe=np.asarray(t_steps))
    direct = np.asarray(noise) - np.asarray(
        model.apply({"params": params}, noise, jnp.ones(n), jnp.ones(n), jnp.full(n, g[0]),
                    jnp.full(n, g[1]), jnp.full(n, g[2]), gen_labels, method=model.u_fn)[0])
    assert np.max(np.abs(direct - gen["sample_1nfe"])) < 1e-13 * np.max(np.abs(direct))
    tensors.update({"gen." + k: np.asarray(v) for k, v in gen.items()})

    hd = SHAPE["hidden_size"] // SHAPE["num_heads"]
    prefix = (SHAPE["num_class_tokens"] + SHAPE["num_cfg_tokens"] + 2 * SHAPE["num_interval_tokens"]
              + SHAPE["num_time_tokens"])
    patches = (s // SHAPE["patch_size"]) ** 2
    rope = imfDiT.precompute_rope_freqs(hd, prefix + patches)
    tensors["const.rope_cos"], tensors["const.rope_sin"] = np.real(rope), np.imag(rope)
    assert all(v.dtype in (np.float64, np.int64) for v in tensors.values()), \
        {k: v.dtype for k, v in tensors.items() if v.dtype not in (np.float64, np.int64)}

    model_meta = dict(SHAPE, num_classes=NUM_CLASSES, head_dim=hd,
                      mlp_hidden_dim=int(SHAPE["hidden_size"] * 8 / 3),
                      shared_depth=SHAPE["depth"] - SHAPE["aux_head_depth"],
                      u_head_depth=SHAPE["aux_head_depth"], v_head_depth=SHAPE["aux_head_depth"],
                      prefix_tokens=prefix, num_patches=patches, total_tokens=prefix + patches,
                      frequency_embedding_size=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                      out_channels=SHAPE["in_channels"], t_input_used=False)
    meta = dict(LOSS, model=model_meta, batch=BATCH, n_fm=n_fm, num_drop=num_drop,
                null_label=NUM_CLASSES, s_max=7.0, sampling=dict(SAMPLING,
                t_steps_1nfe=[1.0, 0.0], t_steps_2nfe=[1.0, 0.5, 0.0]),
                dtype="float64", time_embedding_dtype="float64", rope_dtype="float64",
                attention_dtype="float64", omega_dtype="float64",
                format="official JAX iMeanFlow (flax names and layouts); see "
                       "tests/fixtures/imeanflow-jax/README.md",
                flax_to_torch=flax_to_torch(params),
                source=dict(repo="Lyy-iiis/imeanflow", commit=official.commit(),
                            sha256=official.file_hashes(),
                            writer="tools/make_imf_fixture.py (this repository)"),
                versions=official.versions(),
                rng=dict(seed=SEED, init="fold_in(PRNGKey(seed), 0)",
                         data="fold_in(PRNGKey(seed), 2) split into (x: normal, labels: randint)",
                         gen="fold_in(fold_in(PRNGKey(seed), 4), attempt): the 'gen' rng of "
                             "iMeanFlow.forward", gen_key_attempt=attempt,
                         sample="fold_in(PRNGKey(seed), 3): the rng of imf.generate",
                         perturb="fold_in(PRNGKey(seed * 100 + 1), i), i the sorted path index"))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out_path,
              metadata={"meta": json.dumps(meta)})
    print(json.dumps({"file": out_path, "num_drop": num_drop, "loss": float(loss),
                      "bytes": os.path.getsize(out_path)}))


if __name__ == "__main__":
    main()
