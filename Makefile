# Every command a developer needs; the README explains them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv native demo up test lint typecheck schemas clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(BIN)/.installed

## The optional C parts: the tree model's walk (detector/model/_forest.c) and the memory store's
## entity histories (detector/state/_history.c): same verdicts, faster. Without a C compiler it
## says so, and everything runs in pure Python.
native: venv
	-PYTHONWARNINGS=ignore $(BIN)/python setup.py --quiet build_ext --inplace
	@$(BIN)/python -c "import detector.model._forest, detector.state._history" 2>/dev/null || echo "make native: the C parts are not built (no C compiler?); model and state store run in pure Python, with the same results"

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

clean:
	rm -rf $(VENV) .stack .pytest_cache .mypy_cache .ruff_cache build/temp.* detector/model/_forest.*.so detector/state/_history.*.so
