# The two commands: `make demo` and `make test`. Each sets itself up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all lint format install clean bench bench-gpu figures strip

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

# The fast tier: ruff, then every test not marked slow, notebook or browser, on 2 xdist workers
# (one thread each; a file's tests stay on one worker, so its module fixtures are built once).
FAST := not slow and not notebook and not browser
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -n 2 --dist loadfile -m "$(FAST)"

# The slow tier, the rest (the fresh demo, the kill campaign, the notebooks, the browser, ...):
# one process, as before. `make test-all` is both tiers; .ci/run runs both.
test-slow: $(STAMP)
	$(BIN)/pytest -q -m "not ($(FAST))"

test-all: test test-slow

# Speed and memory against their limits and peers; table + JSON. Long since issue 29: the
# bergson comparison (48 min) and the T = 10,000 conflict ladder (20 min, + 3 min to write its
# 10.5 GB bank once) alone took over an hour on 2 loaded cores; `python -m benchmarks.<one>` runs one.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --out benchmarks/results.json

# The gradient stage and the merge of ~0.5B and ~1.5B Qwen2-style models on the CUDA card present
# (~4 min on one H100); table + JSON. No $(STAMP): its venv gets a CPU torch. With another Python
# (CUDA torch, transformers, tokenizers): make bench-gpu BIN=$(dirname $(command -v python3))
bench-gpu:
	$(BIN)/python -m benchmarks.bench_gpu --out benchmarks/results_gpu.json

# The demo's paper figures in figures/ (listed in figures/README.md): PNG and PDF of each, SVG
# where under 200 kB, from runs/demo (completed first: `make demo`, skipped when current). Static
# export needs Chromium (Debian: apt-get install chromium).
FIG_TMP := runs/demo/paper_figures
figures: $(STAMP)
	@$(BIN)/python -c "import sys; from merit_lab.viz import static_renderer_problem as p; sys.exit(p())"
	$(BIN)/merit-lab run configs/demo.yaml
	rm -rf $(FIG_TMP)
	$(BIN)/merit-lab figures runs/demo --out $(FIG_TMP) --formats png,svg,pdf
	mkdir -p figures
	rm -f figures/*.png figures/*.pdf figures/*.svg $(FIG_TMP)/contact_sheet.png
	cp $(FIG_TMP)/*.png $(FIG_TMP)/*.pdf figures/
	find $(FIG_TMP) -name '*.svg' -size -200k -exec cp {} figures/ \;
	@echo "figures/: now check figures/README.md lists them (tests/test_figures_dir.py)"

# Clear every notebook's outputs and execution counts (Jupyter: Clear Outputs of All Cells).
strip: $(STAMP)
	$(BIN)/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs/ .pytest_cache
