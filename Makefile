# dsv3-jax — the README's commands. Every target creates .venv first when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test test-all demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev,parity,data]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m dsv3_jax.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/forward_backward.py
	$(BIN)/python benchmarks/compile_time.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
