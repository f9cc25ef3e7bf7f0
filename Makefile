# The virtualenv is built from setup.cfg; every target below uses it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/twistd -n relay $(ARGS)

test: $(STAMP)
	$(BIN)/trial $(TRIAL_ARGS) tests

lint: $(STAMP)
	$(BIN)/ruff check relay tests twisted
	$(BIN)/mypy

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info
