# medsight: every target is one command; `make help` lists them.
# Pass stage options with ARGS, e.g. make stage1 ARGS="trainer.max_steps=200 run_name=try1"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
RUN ?= default
ARGS ?=
DATA ?= data/synthetic
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1
export OMP_WAIT_POLICY ?= PASSIVE

.DEFAULT_GOAL := help
.PHONY: help install data stage1 stage2 stage3 eval predict serve demo test test-browser test-all bench bench-gpu lint tensorboard clean

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg pyproject.toml $(wildcard $(CONSTRAINTS))
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	@touch $@

install: $(VENV)/.installed ## create .venv and install medsight (CPU torch pinned; idempotent)

data: install ## generate the embedded synthetic dataset into data/synthetic (skipped when up to date)
	$(PY) -m medsight.data.synthetic --root $(DATA)

stage1: data ## stage 1: train the Region Perceiver (about 5 min on a laptop CPU)
	$(PY) -m stages.stage1 run_name=$(RUN) $(ARGS)

stage2: data ## stage 2: learn the region codebook and assign code tokens (needs stage 1)
	$(PY) -m stages.stage2 run_name=$(RUN) $(ARGS)

stage3: data ## stage 3: align, ground and instruct the LLM (needs stages 1 and 2)
	$(PY) -m stages.stage3 run_name=$(RUN) $(ARGS)

eval: install ## evaluate the final export on the synthetic test splits (writes checkpoints/$(RUN)/eval/)
	@test -f checkpoints/$(RUN)/stage3/export/meta.json || { echo "no stage-3 export: run make stage3 first"; exit 1; }
	$(VENV)/bin/medsight eval run --export checkpoints/$(RUN)/stage3/export --data $(DATA) $(ARGS)

predict: install ## answer + segment one image: make predict IMAGE=x.png QUESTION="..."
	$(VENV)/bin/medsight predict --export checkpoints/$(RUN)/stage3/export --image $(IMAGE) \
		--question "$(QUESTION)" --out checkpoints/$(RUN)/predict

serve: install ## the web app on http://127.0.0.1:7860 over the final export (ARGS="--port 8000 --auth u:p")
	@test -f checkpoints/$(RUN)/stage3/export/meta.json || { echo "no stage-3 export: run make stage3 first"; exit 1; }
	$(VENV)/bin/medsight serve --export checkpoints/$(RUN)/stage3/export $(ARGS)

demo: install ## the whole job from nothing: data, stage1, stage2, stage3, eval, one prediction
	$(PY) -m medsight.demo --run $(RUN) --data $(DATA)

test: install ## the fast CPU test suite (a few minutes)
	$(PY) -m pytest -q

test-browser: install ## the web app in headless Chromium (needs Debian's chromium: apt-get install -y chromium)
	$(PY) -m pytest -q -m browser

test-all: install ## every test, slow ones included
	$(PY) -m pytest -q -m "" 

bench: install ## speed and memory benchmarks (JSON to stdout and bench/results.json)
	$(PY) -m medsight.bench --out bench/results.json

PEAK_TFLOPS ?= 989
bench-gpu: install ## paper-scale GPU benchmark, ~4 min on one H100/H200 (PEAK_TFLOPS = dense bf16 peak)
	$(PY) -m medsight.bench_gpu --peak-tflops $(PEAK_TFLOPS) --out bench/gpu_results.json

lint: install ## ruff
	$(VENV)/bin/ruff check src stages tests

tensorboard: install ## TensorBoard over every run
	$(VENV)/bin/tensorboard --logdir checkpoints

clean: ## remove generated data and run outputs (keeps .venv)
	rm -rf data/synthetic checkpoints/*/ eval
