# whybn: `make all` (set up .venv, run every quick-preset study, build the paper) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
PRESET ?= quick
# The TeX the paper needs (Debian/Ubuntu package names).
TEX_PACKAGES := latexmk texlive-latex-base texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended

.PHONY: all setup tex test test-slow lint figures paper bench clean

# every study at $(PRESET), then the paper (`whybn all` ends with `whybn paper`); one worker process
# per core, one torch thread each (the records are the same as with one process). Runs already in
# $(RESULTS) are skipped: in a clone the committed quick runs are, so this redraws figures and the paper;
# `make all RESULTS=/tmp/r` recomputes every run in a fresh directory (its PDF: /tmp/r/paper/quick/build).
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
RESULTS ?= results
all: setup tex
	$(BIN)/whybn all --preset $(PRESET) --workers $(WORKERS) --results $(RESULTS)

setup: $(STAMP)

# torch is pinned to the local CPU wheel first, so nothing else can pull a CUDA build.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# TeX for the paper: installed with apt-get where we may (root, or sudo without a password);
# otherwise say what to install and go on (the paper's tests then skip, `make paper` stops).
tex:
	@if command -v latexmk >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing TeX: $(TEX_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEX_PACKAGES) >/dev/null || echo "make tex: installing TeX failed; the paper tests will skip"; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		echo "installing TeX: $(TEX_PACKAGES)"; \
		sudo -n apt-get update -qq && sudo -n DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEX_PACKAGES) >/dev/null || echo "make tex: installing TeX failed; the paper tests will skip"; \
	else \
		echo "make tex: latexmk not found and cannot install it here; to build the paper install:"; \
		echo "  apt-get install --no-install-recommends $(TEX_PACKAGES)"; \
	fi

test: setup tex
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

figures: setup
	$(BIN)/whybn figures

# every table and number from results/, then paper/build/main.pdf
paper: setup tex
	$(BIN)/whybn paper --preset $(PRESET)

# Side-by-side against PyHessian and curvlinops, in their own environment (benchmarks/.venv).
bench: setup
	bash benchmarks/setup.sh
	benchmarks/.venv/bin/python benchmarks/hessian.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
