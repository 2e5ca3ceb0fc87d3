# The two commands a user needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev
# `make run PORT=8400` when 8000 is taken; HOST=0.0.0.0 needs LAKESYNC_API_TOKEN
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	$(BIN)/lakesync serve --host $(HOST) --port $(PORT)

test: $(STAMP_DEV)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP_DEV)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)

typecheck: $(STAMP_DEV)
	$(BIN)/mypy

bench: $(STAMP_DEV)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/status.py $(if $(findstring --quick,$(BENCH_ARGS)),--quick)
	$(BIN)/python bench/keys.py $(if $(findstring --quick,$(BENCH_ARGS)),--quick)
	$(BIN)/python bench/startup.py

clean:
	rm -rf $(VENV) .lakesync .pytest_cache .mypy_cache .ruff_cache
