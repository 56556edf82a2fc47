"""What the CPU's float32 matrix product reaches and what one Inception pass costs, the two numbers
docs/PERFORMANCE.md sets the demo's Inception throughput against.
Usage: .venv/bin/python bench/cpu_peak.py   (the project venv's torch and torchvision)"""
import time

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

side = 2048
a, b = torch.randn(side, side), torch.randn(side, side)
a @ b  # warm-up
start = time.perf_counter()
for _ in range(10):
    a @ b
seconds = (time.perf_counter() - start) / 10
print(f"float32 {side}^2 matmul on {torch.get_num_threads()} threads: "
      f"{2 * side**3 / seconds / 1e9:.1f} GFLOP/s")

# torchvision's inception_v3 has the FID network's convolutions (its 1000-way head adds ~4 MFLOP).
net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
with torch.no_grad(), FlopCounterMode(display=False) as counter:
    net(torch.randn(1, 3, 299, 299))
print(f"Inception v3, one 299 x 299 image: {counter.get_total_flops() / 1e9:.2f} GFLOP")
