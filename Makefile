# Two commands do all the set-up on a fresh machine:
#   make demo   # install into .venv, start the server on the tiny built-in models, generate an image and a video
#   make test   # install into .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo serve test bench proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
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

clean:
	rm -rf $(VENV) demo-out .pytest_cache
