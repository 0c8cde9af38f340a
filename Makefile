# The two commands of this project: `make demo` (the main job) and `make test` (lint, then the default test suite).
# Each creates .venv if missing and (re)installs the project when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_BASE := $(VENV)/.stamp-base
STAMP_TEST := $(VENV)/.stamp-test

.PHONY: demo test bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP_BASE): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pip install -q -e '.[test]'
	touch $(STAMP_BASE) $@

demo: $(STAMP_BASE)
	$(BIN)/python -m experiments.demo

test: $(STAMP_TEST)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
