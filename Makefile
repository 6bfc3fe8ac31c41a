# Every command a developer needs; the README explains them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# The optional C modules, named after their sources wherever they sit in detector/
# (setup.py builds every detector/**/_*.c the same way).
NATIVE_MODULES = $(subst /,.,$(basename $(shell find detector -name '_*.c')))
IMPORT_ALL = $(BIN)/python -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"

.PHONY: venv native native-check demo up test lint typecheck schemas wheel clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(BIN)/.installed

## The optional C parts: the tree model's walk (_forest.c) and the memory store's entity
## histories (_history.c): same verdicts, faster. Without a C compiler it says so, and
## everything runs in pure Python.
native: venv
	-PYTHONWARNINGS=ignore $(BIN)/python setup.py --quiet build_ext --inplace
	@$(IMPORT_ALL) $(NATIVE_MODULES) 2>/dev/null || echo "make native: the C parts are not built (no C compiler?); model and state store run in pure Python, with the same results"

## Fails unless every C part is built and imports (CI: the tests compare each with its twin).
native-check: native
	$(IMPORT_ALL) $(NATIVE_MODULES)

## The main job: emulator, functions, simulated stream, live and final report.
demo: venv native
	$(BIN)/python -m stack demo

## The local stack alone, until Ctrl-C.
up: venv native
	$(BIN)/python -m stack up

## Every check: lint, types, schemas in sync, and the whole test suite.
test: venv native lint typecheck
	$(BIN)/python -m detector schemas --check
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

schemas: venv
	$(BIN)/python -m detector schemas

## The package, as pip installs it elsewhere: dist/pubsub_fraud_detector-*.whl
## (tests/test_wheel.py builds one and uses it from a fresh environment: pytest -m wheel).
wheel: venv
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .

clean:
	rm -rf $(VENV) .stack .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find detector -name '*.so' -delete
