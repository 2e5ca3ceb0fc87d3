# The two commands a user needs: `make run` and `make test`.
# Both install the versions pinned in requirements/*.lock (`make lock` after changing the
# dependencies in pyproject.toml; `make upgrade` to move every pin to the newest allowed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_LOCK  := requirements/run.lock
DEV_LOCK  := requirements/dev.lock
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev
# `make run PORT=8400` when 8000 is taken; HOST=0.0.0.0 needs LAKESYNC_API_TOKEN
HOST ?= 127.0.0.1
PORT ?= 8000
# tests run in this many pytest-xdist workers (1: in the pytest process itself); more than
# the 2 cores: the tests mostly wait (servers, leases, slow links), see docs/testing.md
TEST_WORKERS ?= 3

.PHONY: run test test-services lint typecheck bench lock upgrade clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# A stamp is older than its lock when the lock changed (a merge, `make lock`): reinstall.
$(STAMP_RUN): $(RUN_LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python requirements/lock.py check $(RUN_LOCK)
	$(BIN)/python -m pip install --quiet -r $(RUN_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(STAMP_DEV): $(DEV_LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python requirements/lock.py check $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet -r $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	$(BIN)/lakesync serve --host $(HOST) --port $(PORT)

test: $(STAMP_DEV) test-services
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/python -m pytest $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --maxschedchunk 2) $(PYTEST_ARGS)

# Chromium, redis-server and RabbitMQ: installed and started as root (CI), else named
test-services:
	tests/services.sh

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

# Resolves what pyproject.toml added or changed, keeping the other pins.
lock: | $(BIN)/python
	$(BIN)/python requirements/lock.py compile
	@echo "requirements/*.lock updated: run make test on them, then commit them."

# Every pin to the newest version pyproject.toml allows, then the whole suite on them.
upgrade: | $(BIN)/python
	$(BIN)/python requirements/lock.py compile --upgrade
	@echo "requirements/*.lock upgraded; the suite on the upgrade:"
	$(MAKE) test

clean:
	rm -rf $(VENV) .lakesync .pytest_cache .mypy_cache .ruff_cache
