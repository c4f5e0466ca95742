# whybn: `make all` (set up .venv, regenerate every quick-preset figure) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
PRESET ?= quick

.PHONY: all setup test test-slow lint figures bench clean

all: setup
	$(BIN)/whybn all --preset $(PRESET)

setup: $(STAMP)

# torch is pinned to the local CPU wheel first, so nothing else can pull a CUDA build.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

figures: setup
	$(BIN)/whybn figures

# Side-by-side against PyHessian and curvlinops, in their own environment (benchmarks/.venv).
bench: setup
	bash benchmarks/setup.sh
	benchmarks/.venv/bin/python benchmarks/hessian.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
