# initserve: `make run` serves on 127.0.0.1:8000 with the runtime alone (service + client, about
# a minute on a fresh clone); `make test` and `make lint` add the development tools (torch, JAX,
# transformers, mypy, ...) to the same .venv. Each installs what it needs first (the C kernels are
# compiled by that install), showing pip's progress.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two stamps: RUNTIME for `make run`, DEV (which implies it) for everything else; `make test`
# after `make run` adds the dev extra, `make run` after `make test` installs nothing.
RUNTIME := $(VENV)/.runtime-stamp
DEV := $(VENV)/.dev-stamp
SOURCES := pyproject.toml setup.py clients/python/pyproject.toml requirements-torchtitan.txt $(wildcard service/initserve/kernels/*.c service/initserve/kernels/*.h)

.PHONY: install install-runtime run test test-fast lint bench load soak clean

# Bytecode cached, whatever the shell says: some environments (this project's CI among them) set
# PYTHONDONTWRITEBYTECODE=1, and then every process compiles our modules afresh and pytest
# rewrites the asserts of ~400 plugin modules per worker on every run (the suite starts hundreds of
# Python processes: servers, command lines, ranks). Cached, `make test-fast` took 1 min 31-41 s
# here instead of 2 min 02-09 s. An empty value is "not set" to Python.
export PYTHONDONTWRITEBYTECODE :=

# The venv's own pip, not upgraded: it installs everything here, and upgrading it first cost
# 10 s of a fresh clone's first minute.
$(PY):
	$(PYTHON) -m venv $(VENV)

$(RUNTIME): $(SOURCES) | $(PY)
	$(PY) -m pip install -e . -e clients/python
	touch $(RUNTIME)

# torchtitan's model code without its trainer's ~40 dependencies: see requirements-torchtitan.txt.
$(DEV): $(SOURCES) | $(PY)
	$(PY) -m pip install -e '.[dev]' -e clients/python
	$(PY) -m pip install --no-deps -r requirements-torchtitan.txt
	touch $(RUNTIME) $(DEV)

install-runtime: $(RUNTIME)

install: $(DEV)

# SERVE_ARGS come last and win: make run SERVE_ARGS="--port 8001"
run: $(RUNTIME)
	$(VENV)/bin/initserve serve --host 127.0.0.1 --port 8000 $(SERVE_ARGS)

test: $(DEV)
	$(PY) -m pytest

# The inner loop: everything but the end-to-end and multi-process checks (marked slow), on two
# xdist workers (each test's fixtures, server included, are per worker; worksteal evens them out).
test-fast: $(DEV)
	$(PY) -m pytest -m "not slow" -n 2 --dist worksteal

# One mypy run over service, client, tests and bench (pyproject's [tool.mypy]): its cache in
# .mypy_cache makes a warm run take seconds. ruff caches in .ruff_cache.
lint: $(DEV)
	$(VENV)/bin/ruff check service clients tests bench
	$(VENV)/bin/ruff format --check service clients tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

bench: $(DEV)
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_service.py
	$(PY) bench/bench_client.py
	$(PY) bench/bench_init.py
	$(PY) bench/bench_sidecar.py

load: $(DEV)
	$(PY) bench/load.py

# Not part of `make test`: a long run under faults (bench/soak.py). SOAK_SECONDS=60 make soak
SOAK_SECONDS ?= 600
soak: $(DEV)
	$(PY) bench/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) build service/*.egg-info service/initserve/kernels/*.so
