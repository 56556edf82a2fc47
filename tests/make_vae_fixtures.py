"""Golden data for tests/vae.rs, computed by diffusers' AutoencoderKL (the reference the Makefile
installs into .venv; nothing here is ours):
  - tiny/, sd/: diffusers' own save_pretrained of a network with the tiny config and with the SD
    config (stabilityai/sd-vae-ft-ema's shapes), every parameter redrawn at random so that no
    GroupNorm scale is 1 and no bias 0 (a port that dropped one would still pass on fresh init);
  - tiny-legacy/: the tiny weights with the mid-block attention under the names of diffusers' old
    AttentionBlock (query, key, value, proj_attn), as the public sd-vae-ft-* files store them;
    diffusers itself is checked to load it back to the same weights;
  - tiny-io.safetensors: decode of random latents and encode (posterior mean and std) of random
    images, in float32 and in float64 (the same weights and inputs, widened);
  - sd-io.safetensors: the same in float32 for the SD config.
Shapes are not square (latents 6 x 8, images 48 x 64) so that a swapped height and width fails.
Usage: python3 tests/make_vae_fixtures.py OUT_DIR"""
import json, os, shutil, sys

os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local; never reach for the hub
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)

LEVELS = 4
CONFIGS = {
    "tiny": dict(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=4),
    "sd": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
}
# What deprecated attention blocks were called before diffusers' refactor (its
# ModelMixin._fix_state_dict_keys_on_load maps them back).
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def network(name):
    model = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * LEVELS, up_block_types=["UpDecoderBlock2D"] * LEVELS,
        act_fn="silu", sample_size=256, **CONFIGS[name],
    ).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif p.dim() == 1:  # GroupNorm scales
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:  # unit-variance outputs for unit-variance inputs, so activations stay O(1)
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    return model


def run(model, latents, images):
    with torch.no_grad():
        decoded = model.decode(latents).sample
        posterior = model.encode(images).latent_dist
    return {"latents": latents, "images": images, "decoded": decoded,
            "mean": posterior.mean, "std": posterior.std}


for name in CONFIGS:
    model = network(name)
    model.save_pretrained(os.path.join(out, name))  # config.json + diffusion_pytorch_model.safetensors
    latents = torch.randn(2, 4, 6, 8)
    images = torch.rand(2, 3, 48, 64) * 2 - 1
    io = run(model, latents, images)
    if name == "tiny":
        wide = run(model.double(), latents.double(), images.double())
        io.update({f"{k}_f64": v for k, v in wide.items()})
        model.float()
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, f"{name}-io.safetensors"))

    if name == "tiny":
        src = os.path.join(out, "tiny")
        legacy_dir = os.path.join(out, "tiny-legacy")
        os.makedirs(legacy_dir, exist_ok=True)
        shutil.copy(os.path.join(src, "config.json"), legacy_dir)
        weights = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
        legacy = {}
        for key, value in weights.items():
            for new, old in LEGACY.items():
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            legacy[key] = value
        assert sum(".query." in k for k in legacy) == 4, "renaming missed the attention blocks"  # weight, bias; encoder, decoder
        save_file(legacy, os.path.join(legacy_dir, "diffusion_pytorch_model.safetensors"))
        back = AutoencoderKL.from_pretrained(legacy_dir, low_cpu_mem_usage=False).state_dict()
        assert back.keys() == model.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in model.state_dict().items()), "diffusers reads the legacy file differently"

print(f"wrote {sorted(os.listdir(out))} to {out}")
