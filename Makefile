# initserve: `make run` serves on 127.0.0.1:8000, `make test` runs the whole suite. Both install
# what they need into .venv first (the C kernels are compiled by that install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py clients/python/pyproject.toml $(wildcard service/initserve/kernels/*.c service/initserve/kernels/*.h)

.PHONY: install run test test-fast lint bench load soak clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -e clients/python
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/initserve serve --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(PY) -m pytest

# The inner loop: everything but the real multi-process runs (marked slow).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check service clients tests bench
	$(VENV)/bin/ruff format --check service clients tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict clients/python/src/initserve_client
	$(VENV)/bin/mypy --strict --allow-untyped-calls tests bench
	$(VENV)/bin/hadolint Dockerfile

bench: $(STAMP)
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_service.py
	$(PY) bench/bench_client.py
	$(PY) bench/bench_init.py
	$(PY) bench/bench_sidecar.py

load: $(STAMP)
	$(PY) bench/load.py

# Not part of `make test`: a long run under faults (bench/soak.py). SOAK_SECONDS=60 make soak
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(PY) bench/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) build service/*.egg-info service/initserve/kernels/*.so
