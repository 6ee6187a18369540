# Two commands do all set-up (see README):  make demo   |   make test
# Both create or reuse .venv at the repo root; installs are skipped when pyproject.toml has not changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel by default (on these machines it comes from local disk); a GPU user installs CUDA torch into
# .venv first (see README) and this step leaves it alone.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lora-ranks demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf outputs .prefect .pytest_cache
