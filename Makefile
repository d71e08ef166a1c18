# greenprop: two commands do everything on a fresh machine.
#   make demo   set up, then run the demo comparison (baseline and methods, small CNN)
#   make test   set up, then run the test suite
# Setup = a virtualenv in .venv, PyTorch (CPU build, installed first), greenprop with
# its dev extras, and the offline Fashion-MNIST files (Debian package).

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.greenprop-installed

.PHONY: setup data demo test test-slow lint bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

data:
	bash scripts/install-data.sh

demo: setup
	$(VENV)/bin/greenprop compare --preset demo --out runs/demo

test: setup
	PYTHON=$(PY) bash scripts/run-tests.sh

test-slow: setup
	PYTHON=$(PY) bash scripts/run-tests.sh -m slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
