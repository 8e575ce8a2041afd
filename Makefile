# One command each on a fresh machine: `make test`, `make demo`. Both install into .venv first when missing.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench gpu-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull several GB of CUDA wheels on CPU machines.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

# The edit loop: everything but the `slow` tests (torchrun launches, subprocess CLIs, memory probes); ~1-2 min.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python demo/demo.py

bench: $(STAMP)
	$(BIN)/python bench/bench.py

# On a CUDA machine (~5 min on one H100): NCCL doctor, conversion GB/s, bf16 verify, SFT tokens/s and MFU (sdpa, te),
# generate tokens/s -> bench/gpu.json (not in CI; rehearsed by tests/test_gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu.py

lint: $(STAMP)
	$(BIN)/ruff check megallama tests demo bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
