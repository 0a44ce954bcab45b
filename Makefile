# make demo: the default SPPO run (conf/config.yaml); make test: the whole test suite.
# Both create or refresh .venv/ first (the pinned CPU torch before anything that needs torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
TORCH := torch==2.13.0
RUN_DIR ?= runs/demo

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]" $(TORCH)
	rm -f $(VENV)/.installed-* && touch $@

demo: venv
	$(PY) -m spo_ray.train run.dir=$(RUN_DIR)

test: venv
	$(PY) -m pytest -q -x --durations=15 tests

clean:
	rm -rf $(VENV) runs outputs multirun
