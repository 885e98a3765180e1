# The two commands: `make demo` and `make test`. Each sets itself up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean bench bench-gpu

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/merit-lab run configs/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# Speed and memory against their limits and peers (< 15 min on 2 cores); table + JSON.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --out benchmarks/results.json

# The gradient stage and the merge of ~0.5B and ~1.5B Qwen2-style models on the CUDA card present
# (~4 min on one H100); table + JSON. No $(STAMP): its venv gets a CPU torch. With another Python
# (CUDA torch, transformers, tokenizers): make bench-gpu BIN=$(dirname $(command -v python3))
bench-gpu:
	$(BIN)/python -m benchmarks.bench_gpu --out benchmarks/results_gpu.json

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs/ .pytest_cache
