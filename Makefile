# Two commands do all the set-up on a fresh machine:
#   make demo   # install into .venv, start the server on the tiny built-in models, generate an image and a video
#   make test   # install into .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, pinned, as a CPU build: the project's bare `torch>=2.4`
# would pull a multi-GB CUDA build from PyPI. The wheel comes from a local
# wheel folder pip is configured with, else from TORCH_INDEX, else from the
# configured indexes; then its dependencies. For a CUDA build, e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 (with no local CPU wheel).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: install demo serve test bench proto clean gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --no-deps --no-index "$(TORCH_SPEC)" 2>/dev/null \
		|| $(BIN)/pip install -q --no-deps "$(TORCH_SPEC)" --index-url "$(TORCH_INDEX)" || true
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/genserve serve --demo

serve: install
	$(BIN)/genserve serve

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

proto: install
	$(BIN)/python protos/generate.py

# Wheels the GPU machine's image lacks (Python 3.12, x86-64), for
# experiments/gpu_check.sh there: they travel in .whl/ (git-ignored).
GPU_WHEELS := diffusers==0.42.1 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
	protobuf==7.36.2 av==18.1.0
gpu-wheels: install
	rm -rf .whl  # one version of each: two would fail the install on the device
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
