# Two entry points a fresh machine needs: `make demo` (main job) and `make test`.
# Setup creates .venv; on a machine without CUDA it installs the CPU build of torch first so
# that no dependency can pull a multi-GB CUDA wheel.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
TORCH_CPU ?= 2.13.0

.PHONY: setup demo test lint bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	  else $(BIN)/pip install -q torch==$(TORCH_CPU); fi; fi
	$(BIN)/pip install -q -e ".[dev,ray,hf]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/maskscale demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=25

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/pipeline_bench.py
