# chatray: `make demo` (whole platform on one machine) and `make test` (the test suite).
# Both create .venv and install everything on a fresh machine; re-running is fast.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.chatray-installed
# The CPU build of torch where no NVIDIA GPU is present (an unpinned torch pulls a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
VERBOSE ?= $(CHATRAY_VERBOSE)

.PHONY: setup demo test test-unit test-integration test-e2e test-stock-serve down bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> setting up $(VENV) (first time takes a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "==> torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "==> NVIDIA GPU found: installing the CUDA build of torch"; $(BIN)/pip install -q torch; \
	else \
		echo "==> no GPU: installing the CPU build of torch"; \
		$(BIN)/pip install -q "$(TORCH_CPU)" || $(BIN)/pip install -q torch --index-url $(TORCH_CPU_INDEX); \
	fi
	@$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)
	@echo "==> environment ready: $$($(BIN)/chatray --version)"

# `make demo VERBOSE=1` prints Ray's own output too (else it goes to log files whose paths are printed).
demo: $(STAMP)
	@CHATRAY_VERBOSE=$(VERBOSE) $(BIN)/python -m chatray.demo

down: $(STAMP)
	@$(BIN)/chatray down

# e2e runs in its own pytest process: it drives a `ray start --head` cluster and the Jobs SDK, whose
# process-wide Ray auth state must not leak into the in-process Ray of the other tiers.
test: $(STAMP)
	@$(BIN)/python -m pytest tests -m "not e2e" $(PYTEST_ARGS)
	@$(BIN)/python -m pytest tests/e2e -m e2e $(PYTEST_ARGS)

test-unit: $(STAMP)
	@$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	@$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: $(STAMP)
	@$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

# The serving tests on Ray Serve's stock data plane (Ray actor calls) instead of chatray's gRPC one.
test-stock-serve: $(STAMP)
	@RAY_SERVE_USE_GRPC_BY_DEFAULT=0 $(BIN)/python -m pytest tests/integration/test_serve.py $(PYTEST_ARGS)

bench: $(STAMP)
	@$(BIN)/python benchmarks/bench_data.py
	@$(BIN)/python benchmarks/bench_train.py
	@$(BIN)/python benchmarks/bench_serve.py

lint: $(STAMP)
	@$(BIN)/ruff check platform tests benchmarks jobs

clean:
	rm -rf $(VENV) .demo .pytest_cache
