# The two commands of the README:
#   make demo   runs the main job (examples/demo.py) in a fresh .venv; DEMO_ARGS="--workers 4" runs
#               the service as 4 worker processes writing one store set
#   make test   installs the package (built as a wheel, not editable) into .venv and runs the
#               whole suite from outside the checkout, so the installed package is what is tested
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SRC    := $(shell find quipu_logging -name '*.py' -o -name py.typed) setup.cfg pyproject.toml README.md
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: test demo bench crash soak lint typecheck check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python $(SRC)
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps .
	$(BIN)/python -m pip install --quiet '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	cd $(VENV) && QUIPU_EXPECT_INSTALLED=1 ./bin/python -m pytest -p no:cacheprovider \
		-c $(CURDIR)/pyproject.toml --rootdir $(CURDIR) $(CURDIR)/tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/store.py

# The reliability runs too long for the suite (its short versions run in make test):
#   make crash   200 SIGKILLs of a writer, seeded (SEED=n to vary), ~4 min
#   make soak    8 producers for 5 minutes against a periodically slowed writer
SEED ?= 1
crash: $(STAMP)
	$(BIN)/python tests/reliability/crash_harness.py --kills 200 --seed $(SEED)

soak: $(STAMP)
	$(BIN)/python bench/soak.py

lint: $(STAMP)
	$(BIN)/ruff check quipu_logging tests examples bench
	$(BIN)/ruff format --check quipu_logging

typecheck: $(STAMP)
	$(BIN)/mypy --strict quipu_logging

check: test lint typecheck

clean:
	rm -rf $(VENV) .venv-* build dist *.egg-info .hypothesis demo-store
