# Scalple: two commands on a fresh Debian machine.
#   make demo   private PostgreSQL + PgBouncer + Scalple, a workload, the audit log
#   make test   the whole test suite against real components
# Both install what is missing: Debian packages, the venv, the Cython build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSTAMP := $(VENV)/.sysdeps
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PG_BINDIR := $(shell pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)

.PHONY: demo test lint bench sysdeps build clean

demo: $(STAMP)
	$(VENV)/bin/scalple demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check scalple tests benchmarks
	$(VENV)/bin/mypy scalple

bench: $(STAMP)
	$(PY) benchmarks/pgbench_compare.py

# Debian packages: PostgreSQL 15 server, PgBouncer, pgAudit. Checked each
# time (cheap); installed only when something is missing.
sysdeps:
	@if [ -x /usr/lib/postgresql/15/bin/postgres ] && command -v pgbouncer >/dev/null 2>&1 \
	    && [ -f /usr/lib/postgresql/15/lib/pgaudit.so ] && command -v psql >/dev/null 2>&1; then \
	  :; \
	else \
	  echo "installing Debian packages: postgresql-15 pgbouncer postgresql-15-pgaudit"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    postgresql-15 postgresql-client-15 pgbouncer postgresql-15-pgaudit >/dev/null; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The project with its test extras and the Cython build; redone when the
# build inputs change.
$(STAMP): $(VENV)/bin/python pyproject.toml setup.py scalple/_wire.pyx | sysdeps
	$(PY) -m pip install -q "setuptools>=68" wheel "Cython>=3.0"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@touch $(STAMP)

build: $(STAMP)

clean:
	rm -rf build scalple/*.so scalple/_wire.c *.egg-info .pytest_cache .mypy_cache .ruff_cache
