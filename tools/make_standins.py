"""Stand-ins of the released files the B/4 path downloads, for `make rehearse` (tests/rehearse.rs),
each in its release's format and written by the program that writes the real one, tiny:
  - meanflow-B4.pth: the PyTorch port's checkpoint (torch.save of {'ema': state dict}, as the
    port's generate_meanflow.py reads it) of the tiny SiT in tests/fixtures/flax (4 channels,
    hidden 32, depth 2, 2 heads, patch 2, 10 classes): the official JAX stand-in's EMA weights
    (tests/fixtures/flax/expected.safetensors, written by the official code), converted as the
    port converted the JAX release (Dense kernels transposed, the patch convolution HWIO -> OIHW,
    the flax wrappers' levels dropped) with the port's fixed 2-D sin-cos position table for
    B/4's 32 x 32 latents (the flax network computes its table for any input; the port stores
    it), so that both stand-ins hold one network, as both releases do;
  - VIRTUAL_imagenet256_labeled.npz: ADM's reference batch layout (arr_0 uint8 NHWC images;
    mu, sigma of 2048 pool features; mu_s, sigma_s of 2023 spatial features; float64), 16
    64 x 64 images and statistics of random features (the real ones are TensorFlow Inception's);
  - fid-stats.npz: the official JAX code's statistics-only reference (ref_mu, ref_sigma);
  - sd-vae.safetensors: diffusers' own save_pretrained of an AutoencoderKL of SD's structure
    (four levels, 8x downscale, 32 groups) at widths 32, 32, 64, 64 and one resnet a level, every
    parameter redrawn at random, the mid-block attention under the old names (query, key, value,
    proj_attn) as the public sd-vae-ft-* files store them.
The JAX checkpoint itself is tests/fixtures/flax/msgpack (zipped by the test); pytorch-fid's
Inception is copied from $MFR_IMPORT_FIXTURES (default target/import-fixtures)/pt_inception_random.pth. Deterministic: the same bytes on
every run (fixed seeds, no timestamps).
Usage: python3 tools/make_standins.py OUT_DIR"""
import os, shutil, sys, tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local; never reach for the hub
import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.manual_seed(0)
rng = np.random.default_rng(0)


# --- meanflow-B4.pth --------------------------------------------------------------------------
def torch_key(flax_path):
    """The PyTorch SiT's key of a flax parameter path, and whether its kernel is transposed."""
    parts = [p for p in flax_path.split("/") if p not in ("net", "_flax_linear", "_flax_embedding")]
    parts = [p[len("layers_"):] if p.startswith("layers_") else p for p in parts]
    leaf = {"kernel": "weight", "embedding": "weight", "bias": "bias"}[parts[-1]]
    return ".".join(parts[:-1] + [leaf])


def sincos_2d(dim, grid):
    """The fixed position table of the PyTorch SiT (MAE's get_2d_sincos_pos_embed), float64."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)


flax = load_numpy(os.path.join(root, "tests/fixtures/flax/expected.safetensors"))
ema = {}
for name, value in sorted(flax.items()):
    if not name.startswith("ema."):
        continue
    t = torch.from_numpy(value.copy())
    if t.dim() == 2 and name.endswith("/kernel"):
        t = t.t()
    elif t.dim() == 4:
        t = t.permute(3, 2, 0, 1)
    ema[torch_key(name[len("ema."):])] = t.contiguous()
hidden, grid = ema["x_embedder.proj.weight"].shape[0], 32 // ema["x_embedder.proj.weight"].shape[2]
ema["pos_embed"] = torch.from_numpy(sincos_2d(hidden, grid)).float().unsqueeze(0)
torch.save({"ema": ema}, os.path.join(out, "meanflow-B4.pth"))

# --- the reference batch and the statistics-only reference ------------------------------------
def stats(dim, n):
    """mu and sigma of n random features (sigma full rank: n > dim)."""
    feats = rng.standard_normal((n, dim)) * rng.uniform(0.5, 1.5, dim) + rng.uniform(0, 1, dim)
    return feats.mean(0), np.cov(feats, rowvar=False)


side = np.linspace(0, 1, 64)
images = []
for i in range(16):  # precision and recall need k + 1 = 4 at least
    a, b, c = rng.uniform(0, 2 * np.pi, 3)
    wave = np.sin(a + 6 * side[:, None] * np.cos(b) + 6 * side[None, :] * np.sin(b))
    rgb = np.stack([wave, np.roll(wave, 8 * (i % 3), 0), np.cos(c) * wave], -1)
    images.append(((rgb + 1) * 127.5 + rng.normal(0, 8, rgb.shape)).clip(0, 255).astype(np.uint8))
mu, sigma = stats(2048, 2560)
mu_s, sigma_s = stats(2023, 2560)
np.savez(os.path.join(out, "VIRTUAL_imagenet256_labeled.npz"), arr_0=np.stack(images),
         mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
np.savez(os.path.join(out, "fid-stats.npz"), ref_mu=mu, ref_sigma=sigma)

# --- the SD-VAE --------------------------------------------------------------------------------
vae = AutoencoderKL(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32, act_fn="silu",
    sample_size=64,
).eval()
with torch.no_grad():
    for name, p in vae.named_parameters():
        # Scales near 1, the rest small: decoded images stay in range rather than saturating.
        p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                else 0.05 * torch.randn_like(p))
with tempfile.TemporaryDirectory() as tmp:
    vae.save_pretrained(tmp, safe_serialization=True)
    tensors = load_file(os.path.join(tmp, "diffusion_pytorch_model.safetensors"))
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
renamed = {}
for key, t in tensors.items():
    for new, old in LEGACY.items():
        key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    renamed[key] = t.contiguous()
save_file(renamed, os.path.join(out, "sd-vae.safetensors"))

fixtures = os.environ.get("MFR_IMPORT_FIXTURES", os.path.join(root, "target/import-fixtures"))
shutil.copyfile(os.path.join(fixtures, "pt_inception_random.pth"), os.path.join(out, "pt_inception.pth"))
print(f"stand-ins in {out}: {sorted(os.listdir(out))}")
