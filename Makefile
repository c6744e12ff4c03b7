# Care Companion: the two commands a newcomer needs are `make run` and `make test`.
# Everything is set up from nothing: a virtualenv, dependencies, compiled catalogs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup bytecode run shell test lint i18n services clean

$(STAMP): pyproject.toml scripts/system-packages.sh
	bash scripts/system-packages.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

locales/%/LC_MESSAGES/messages.mo: locales/%/LC_MESSAGES/messages.po $(STAMP)
	$(BIN)/pybabel compile -d locales -D messages -l $*

CATALOGS := $(patsubst %.po,%.mo,$(wildcard locales/*/LC_MESSAGES/messages.po))

setup: $(STAMP) $(CATALOGS) bytecode

# The project's bytecode, written ahead: every start of the bot reads it instead of compiling
# each module again (0.6 s of CPU a start here), also where PYTHONDONTWRITEBYTECODE is set or
# the tree is read-only, so Python cannot cache it itself. Only changed files are recompiled.
# (pip wrote the dependencies' bytecode when it installed them.)
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q bot core adapters handlers intake checklists

run: setup
	$(BIN)/care-companion run

shell: setup
	$(BIN)/care-companion shell

# Starts PostgreSQL and Redis if they are installed here but not answering.
services:
	@bash scripts/services.sh

test: setup services
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q -ra -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Extract messages (code and checklist files), merge into every catalog, compile.
i18n: setup
	$(BIN)/python scripts/i18n.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
	find locales -name '*.mo' -delete
