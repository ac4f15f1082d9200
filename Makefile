# lrq: `make demo` runs the main job on the embedded default; `make test` passes the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LRQ    := $(VENV)/bin/lrq
DOCS   ?= 30000

.PHONY: venv bytecode demo demo-logs lint test test-slow test-all services bench bench-deps bench-quick clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $@

# Bytecode for the project's modules (the venv's is compiled at install, best effort). Python
# only reads it where PYTHONDONTWRITEBYTECODE=1 (as on the machines here) stops it writing its
# own, so without this every process the tests start compiles SQLAlchemy and lrq from source:
# two crash-window test files took 144 s against 60 s with bytecode. Stale files are
# recompiled, the rest checked (~0.3 s).
bytecode: venv
	$(PY) -m compileall -q -j 0 lrq workers tests bench

# The main job: sample documents -> entities worker -> data/results.db, scheduler until idle.
demo: venv bytecode
	$(PY) -m lrq.sample --docs $(DOCS) --url sqlite:///data/source.db
	$(LRQ) -c lrq.toml run --until-idle
	$(LRQ) -c lrq.toml status
	$(LRQ) -c lrq.toml verify
	$(PY) -m lrq.sample --peek sqlite:///data/results.db doc_ent_map

# The log job (demo-logs.toml): a day of sample access logs, rotated twice, tailed into parsed
# lines and sliding-window counts in data/demo-logs/results.db; starts from nothing each time.
LOG_LINES ?= 60000
demo-logs: venv bytecode
	rm -rf data/demo-logs
	$(PY) -m workers.apache_sample --out data/demo-logs/logs --lines $(LOG_LINES)
	$(LRQ) -c demo-logs.toml run --until-idle
	$(LRQ) -c demo-logs.toml status
	$(LRQ) -c demo-logs.toml verify
	$(PY) -m workers.apache_sample --peek sqlite:///data/demo-logs/results.db \
		access_status_windows access_remote_windows

# Real PostgreSQL and MariaDB servers for the sink tests (Debian packages; needs root).
services:
	bash tests/services/install.sh

# ruff and mypy first: lint findings fail the run before the servers start.
lint: venv
	$(VENV)/bin/ruff check lrq workers tests bench
	$(VENV)/bin/mypy

test: venv bytecode lint services
	$(PY) -m pytest -q

test-slow: venv bytecode services
	$(PY) -m pytest -q -m slow

test-all: test test-slow

# The bench extra: Huey, the peer bench/peer_huey.py compares lrq with.
bench-deps: $(VENV)/.bench-installed
$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# W1, W2, claim cost, idle cost, poison, the Huey peer in sequence, then one summary against
# the targets (~15 min).
bench: venv bytecode bench-deps
	$(PY) bench/all.py

bench-quick: venv bytecode bench-deps
	$(PY) bench/all.py --quick

clean:
	rm -rf data/*/ data/*.db data/*.db-* data/lrq.log* .pytest_cache
