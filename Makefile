# gem3d: the two README commands. Each creates .venv with pip and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
DEMO_OUT ?= demo_out
WORKERS ?= 2

.PHONY: venv test demo clean bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -n $(WORKERS) -q

demo: venv
	$(PY) scripts/demo.py --out $(DEMO_OUT)

BENCH_ARGS ?= --quick --threads 1

bench: venv
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) logs
