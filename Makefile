# Two entry points for a fresh checkout: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test lint typecheck unit docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a local CPU build is used; an unpinned torch pulls several GB of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/loramerge demo

lint: setup
	$(BIN)/ruff check src tests bench examples docs/conf.py
	$(BIN)/ruff format --check src tests bench examples docs/conf.py

typecheck: setup
	$(BIN)/mypy --strict src

unit: setup
	$(BIN)/python -m pytest

docs: setup
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	$(BIN)/sphinx-build -W --keep-going -q -b doctest -D nb_execution_mode=off docs docs/_build/doctest

test: lint typecheck unit docs

bench: setup
	$(BIN)/python bench/merge_in_memory.py

clean:
	rm -rf $(VENV) docs/_build dist build .pytest_cache .mypy_cache .ruff_cache .hypothesis
