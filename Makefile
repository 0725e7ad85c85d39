# Two entry points on a fresh machine:  make run   and   make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TESTS ?= tests
CONFIG ?= etc/ctrlgw.ini

.PHONY: run test install lint bench bench-partitions clean mutate model

# Dependencies, installed once per change of the package metadata or the pins.  The bench
# extras are in too: the test suite runs the benchmark's smoke mode (tests/test_bench_smoke.py).
$(VENV)/.deps: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt '.[embedded,test,bench]'
	touch $@

# ctrlgw itself, as a plain (non-editable) install: that is what twistd's plugin lookup
# must work with.  Re-run every time so the installed copy matches the checkout; build/ goes
# first, since setuptools copies whatever it still holds (a file since renamed or removed).
install: $(VENV)/.deps
	rm -rf build
	$(BIN)/pip install -q --no-deps --no-build-isolation --force-reinstall .

run: install
	$(BIN)/twistd -n --pidfile= ctrlgw --config $(CONFIG)

test: install
	$(BIN)/python -m twisted.trial --temp-directory=var/_trial_temp $(TESTS)

# The benchmark (not a timed test): every scenario against the embedded PostgreSQL, each
# figure 3 times; writes var/bench.json, docs/benchmarks.md and docs/bench/*.png.
# BENCH_ARGS="--smoke" for a tiny check run (under var/), "--help" for every knob.
bench: install
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# Inbound with retention running: time partitions against DELETE (bench/partitions.py).
bench-partitions: install
	$(BIN)/python bench/partitions.py $(BENCH_ARGS)

# Mutation testing of the ownership, inbox and outbox core (docs/testing.md, "Mutation
# testing"): incremental, cached in var/mutate/; writes docs/mutation/survivors.txt.
# MUTATE_ARGS="--fresh" starts afresh; module paths (ctrlgw/outbox.py) run only those.
$(VENV)/.mutate-deps: $(VENV)/.deps
	$(BIN)/pip install -q -c constraints.txt '.[mutate]'
	touch $@

mutate: install $(VENV)/.mutate-deps
	nice -n 10 $(BIN)/python tests/mutate.py $(MUTATE_ARGS)

# The model-checked ownership protocol (docs/model/README.md): every property on the model
# and every bad variant; needs spin and a C compiler (Debian: apt-get install spin gcc).
model:
	docs/model/check.sh var/model

lint: install
	$(BIN)/ruff check ctrlgw tests twisted
	$(BIN)/mypy ctrlgw

clean:
	rm -rf $(VENV) build *.egg-info var/_trial_temp
