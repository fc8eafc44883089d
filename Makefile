# Everything runs inside .venv, built from the pinned file (CPU torch 2.13: no CUDA packages pulled in).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-gpu test-slow demo compare bench audit roofline lint format clean

$(STAMP): requirements/pinned.txt requirements/nodeps.txt setup.py pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/pinned.txt
	$(BIN)/pip install -q --no-deps -r requirements/nodeps.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# default tier: CPU, Triton interpreter. Run pytest from its binary, not `python -m pytest`, which would put
# the repo root on sys.path and let the top-level kernels/ folder shadow the hub package named `kernels`.
test: $(STAMP)
	$(BIN)/pytest -q

test-gpu: $(STAMP)
	$(BIN)/pytest -q -m gpu

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

demo: $(STAMP)
	$(BIN)/sails-fast demo

# SAILS vs its baselines on the embedded model, 3 seeds (2 CPU cores: about an hour); finished runs are reused
compare: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/sails-fast compare --config benchmarks/compare/smollm2.json --out runs/compare \
		--results benchmarks/results/compare
	$(BIN)/python benchmarks/make_tables.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_lora.py

# static audit of every Triton kernel for sm_90/89/86/80 (no GPU needed), then its README table
audit: $(STAMP)
	$(BIN)/python benchmarks/kernel_audit.py
	$(BIN)/python benchmarks/kernel_audit.py --readme

roofline: $(STAMP)
	$(BIN)/python benchmarks/roofline.py --readme

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
