# Everything a fresh machine with Python 3.11 needs: `make run` serves the gateway, `make test`
# runs the whole test suite. Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run supervise migrate test lint bench browser promtool

run: $(VENV)/.runtime
	$(BIN)/python -m app migrate
	$(BIN)/hypercorn --config file:hypercorn_config.py wsgi:app

# WORKERS processes of their own under supervisord on one socket (README: Operations).
supervise: $(VENV)/.runtime
	$(BIN)/python -m app migrate
	$(BIN)/python -m app supervise

migrate: $(VENV)/.runtime
	$(BIN)/python -m app migrate

test: $(VENV)/.dev
	$(BIN)/pytest

bench: $(VENV)/.runtime
	$(BIN)/python benchmarks/run.py --reps 3

# Headless Chromium for the dashboard's browser test (tests/test_browser.py): Debian's package.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then echo "browser: $$($(CHROMIUM) --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
	  echo "browser: $(CHROMIUM) is missing; install it as root: apt-get install -y chromium" >&2; \
	  exit 1; \
	fi
	@command -v node >/dev/null || echo "browser: node (20 or newer) is missing too" >&2

# promtool for the alert rules' tests (tests/test_prometheus.py): Debian's prometheus package.
PROMTOOL := /usr/bin/promtool
promtool:
	@if [ -x $(PROMTOOL) ]; then $(PROMTOOL) --version 2>&1 | head -n 1; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; \
	else \
	  echo "promtool: $(PROMTOOL) is missing; install it as root: apt-get install -y prometheus" >&2; \
	  exit 1; \
	fi

lint: $(VENV)/.dev
	$(BIN)/ruff check app client tests config.py wsgi.py
	$(BIN)/ruff format --check app client tests config.py wsgi.py
	$(BIN)/mypy app config.py client/sigmax_client

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt client/pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt client/pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.runtime
