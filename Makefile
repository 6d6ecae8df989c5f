# Two commands that work on a fresh machine (CPU, offline models):
#   make demo   set up .venv and run the demo on the embedded tiny model
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/vtc demo

test: setup
	$(BIN)/ruff check vtc tests eval
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python eval/bench_overhead.py

clean:
	rm -rf $(VENV) out .pytest_cache
