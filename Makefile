# Two commands do all set-up (see README):  make demo   |   make test
# Both create or reuse .venv at the repo root; installs are skipped when pyproject.toml has not changed.
# Prefect's defaults (PREFECT_HOME = .prefect/ of this checkout, no telemetry, a patient ephemeral server) are set in
# one place, flows/_runtime.py, which the CLI, the flows and the tests all go through.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel by default (on these machines it comes from local disk); a GPU user installs CUDA torch into
# .venv first (see README) and this step leaves it alone.
TORCH_SPEC ?= torch==2.13.0
UV_SPEC ?= uv==0.13.10
STAMP := $(VENV)/.installed

.PHONY: demo test quick lint setup clean interop

setup: $(STAMP)

# Where pip is told to look for wheels on disk (PIP_FIND_LINKS, or pip's own config), uv looks too: uv reads no pip
# configuration, and these machines keep the CPU torch wheel there.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))

# uv installs the project and its packages (the same versions pip picks) in ~30 s where pip takes ~90 s, byte-code
# compiled as pip does it (else every first import in the tests would compile it), on every core. Torch comes in the
# same step only where .venv has none: a torch already there (a CUDA build, say) satisfies the project's range and
# is left alone.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install --quiet "$(UV_SPEC)"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(foreach d,$(FIND_LINKS),--find-links $(d)) \
		$$($(BIN)/python -c "import torch" 2>/dev/null || echo "$(TORCH_SPEC)") -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lora-ranks demo

# What CI runs (.ci/run): the linter, then every test, on two workers (pytest-xdist: the slowest tests start Prefect
# servers and wait on them, so a second worker uses the time; the README gives the measured time).
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=25

# For local iteration: everything but the slow end-to-end tests (flows, servers, runners).
quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

# llama.cpp as a real serving client of exported adapters (builds llama.cpp: ~6 minutes on 2 cores; not in CI).
interop: $(STAMP)
	$(BIN)/python -c "import llama_cpp, sentencepiece" 2>/dev/null || $(BIN)/pip install --quiet llama-cpp-python==0.3.36 sentencepiece
	$(BIN)/python benchmarks/interop_llamacpp.py

clean:
	rm -rf outputs .prefect .pytest_cache .ruff_cache
