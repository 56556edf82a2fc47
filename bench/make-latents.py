"""Synthetic SD-VAE latents in the REPA layout, for timing a real `mfr run` on the GPU machine."""
import json, os, sys
import numpy as np
root, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
labels = []
for i in range(n):
    d = os.path.join(root, "vae-sd", f"{i:08d}"[:5])
    os.makedirs(d, exist_ok=True)
    name = f"img-mean-std-{i:08d}.npy"
    moments = np.concatenate([rng.standard_normal((4, 32, 32)) * 5, np.full((4, 32, 32), 0.1)]).astype(np.float32)
    np.save(os.path.join(d, name), moments)
    labels.append([f"{i:08d}"[:5] + "/" + name, int(rng.integers(1000))])
json.dump({"labels": labels}, open(os.path.join(root, "vae-sd", "dataset.json"), "w"))
