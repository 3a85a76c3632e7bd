# Everything a fresh machine with Python 3.11 needs: `make run` serves the gateway, `make test`
# runs the whole test suite. Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run migrate test lint bench

run: $(VENV)/.runtime
	$(BIN)/python -m app migrate
	$(BIN)/hypercorn --config file:hypercorn_config.py wsgi:app

migrate: $(VENV)/.runtime
	$(BIN)/python -m app migrate

test: $(VENV)/.dev
	$(BIN)/pytest

bench: $(VENV)/.runtime
	$(BIN)/python benchmarks/run.py --reps 3

lint: $(VENV)/.dev
	$(BIN)/ruff check app client tests config.py wsgi.py
	$(BIN)/mypy app config.py client/sigmax_client

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(VENV)/bin/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt client/pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.runtime
