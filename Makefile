# dsv3-jax — the README's commands. Every target creates .venv first when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
JOBS ?= 2   # pytest-xdist workers: XLA compiles are single-threaded, so one per core

.PHONY: setup test test-all demo post-train-demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev,parity,data,tpu]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadgroup --durations=25 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadgroup -m "" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m dsv3_jax.demo

post-train-demo: $(STAMP)   # SFT then GRPO from the `make demo` checkpoint (runs/post_train)
	$(BIN)/python -m dsv3_jax.post_train_demo

bench: $(STAMP)
	@for b in forward_backward compile_time train_step train_step_parts decode expert_parallel mla fp8_gemm fp8_training convert multiprocess plan pipeline ablations; do \
	  test -f benchmarks/$$b.py && $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
