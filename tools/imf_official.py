"""The official improved-MeanFlow code (Lyy-iiis/imeanflow), IMPORTED unchanged from the checkout
named by the environment variable MEANFLOW_IMF_REF, for the tools that write golden data from it
(tools/make_imf_checkpoint.py). Nothing of it is copied here.

What this module adds, at run time only:
- `wandb` as an empty module when it is not installed: the official utils/logging_util.py imports
  it for its experiment logger, which saving and restoring checkpoints never call.
- `register(name, **shape)`: a tiny network preset beside the official imfDiT_B_2 ... partials,
  so the official iMeanFlow builds it by name exactly as it builds the released ones.
- `use_float64()`: the float64 numerics of the official float64 golden steps
  (tests/fixtures/imeanflow-jax/README.md, "Numerics"): x64 on, and in imf.py, models/embedder.py
  and models/imfDiT.py the names `jnp.float32` / `jnp.complex64` read as float64 / complex128 (the
  official code hard-codes float32 for the sinusoids, the RoPE table and rotation, the attention
  and omega, and its RoPE does not run at all on float64 activations). Returns an iMeanFlow
  subclass whose `dtype` (the draws' and the sampler's noise dtype) is float64.
"""
import functools
import importlib.util
import os
import subprocess
import sys
import types

REF = os.environ.get("MEANFLOW_IMF_REF")
if not REF:
    sys.exit("set MEANFLOW_IMF_REF to a checkout of Lyy-iiis/imeanflow (branch main)")
sys.path.insert(0, os.path.abspath(REF))

if importlib.util.find_spec("wandb") is None:
    sys.modules["wandb"] = types.ModuleType("wandb")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# Official code (imported, unchanged).
import imf  # noqa: E402
from configs import default as default_config  # noqa: E402
from models import embedder, imfDiT  # noqa: E402
from utils import ckpt_util, trainstate_util  # noqa: E402

OFFICIAL_FILES = ["imf.py", "models/imfDiT.py", "models/embedder.py", "models/torch_models.py",
                  "utils/ckpt_util.py", "utils/trainstate_util.py", "configs/default.py"]


def register(name, **shape):
    """imfDiT.<name> = partial(imfDiT.imfDiT, **shape), as the official presets are defined."""
    setattr(imfDiT, name, functools.partial(imfDiT.imfDiT, **shape))


class _Float64Names:
    """`jnp` with float32 read as float64 and complex64 as complex128; everything else jnp's."""
    float32 = jnp.float64
    complex64 = jnp.complex128

    def __getattr__(self, name):
        return getattr(jnp, name)


def use_float64():
    jax.config.update("jax_enable_x64", True)
    for module in (imf, embedder, imfDiT):
        module.jnp = _Float64Names()

    class iMeanFlow64(imf.iMeanFlow):
        dtype = jnp.float64

    return iMeanFlow64


def perturb(params, seed, hidden):
    """The golden steps' perturbation of an official init (tests/fixtures/imeanflow-jax/README.md):
    every parameter the official init leaves at zero or one made non-trivial, gates N(0, 1),
    biases N(0, 0.2^2), final kernels N(0, 1/hidden), RMSNorm scales 1 + N(0, 0.2^2); the others
    as initialised. Key: fold_in(PRNGKey(seed), i), i the index of the '/'-joined path in sorted
    order. Not official code: the rule the tools here share."""
    import flax
    import numpy as np
    from flax import traverse_util
    f = traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    base = jax.random.PRNGKey(seed)
    out = {}
    for i, k in enumerate(sorted(f)):
        p = np.asarray(f[k])
        n = np.asarray(jax.random.normal(jax.random.fold_in(base, i), p.shape, p.dtype))
        leaf, parent = k.split("/")[-1], k.split("/")[-2]
        if leaf in ("attn_scale", "mlp_scale"):
            v = n
        elif leaf == "bias":
            v = 0.2 * n
        elif leaf == "kernel" and "final_layer" in k and parent == "_flax_linear":
            v = n / np.sqrt(hidden)
        elif leaf == "kernel" and p.ndim == 1:
            v = 1.0 + 0.2 * n
        else:
            v = p
        out[k] = jnp.asarray(np.asarray(v).astype(p.dtype))
        assert np.all(np.asarray(out[k]) != 0), k
    return traverse_util.unflatten_dict(out, sep="/")


def commit():
    c = os.environ.get("MEANFLOW_IMF_COMMIT")
    if c:
        return c
    try:
        return subprocess.check_output(["git", "-C", REF, "rev-parse", "HEAD"], text=True).strip()
    except Exception:  # not a git checkout
        return "unknown"


def file_hashes():
    import hashlib
    out = {}
    for f in OFFICIAL_FILES:
        with open(os.path.join(REF, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


def versions():
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for name in ["jax", "jaxlib", "flax", "orbax-checkpoint", "optax", "numpy", "msgpack",
                 "tensorstore", "ml_dtypes", "safetensors"]:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
