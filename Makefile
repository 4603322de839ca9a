# gem3d: the two README commands. Each creates .venv with pip and installs what it needs.
# Also: `make nnunet` (nnU-Net v2 beside the CPU torch; `make test` needs it so that its test runs) and
# `make downstream` (after `make demo`: segmenters trained on real vs real + synthetic cases).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
DEMO_OUT ?= demo_out
WORKERS ?= 2

.PHONY: venv nnunet test demo downstream clean bench

# pip byte-compiles each installed file on one core (about 60 s of a 90 s install here); compileall does it on all
# cores instead (about 45 s). A file that this Python cannot compile (torch ships Python 3.12-only test helpers) is
# skipped, as pip skips it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e ".[dev,demo]"
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

venv: $(VENV)/.installed

# nnU-Net v2 without its own requirements (timm -> torchvision -> a CUDA torch), then the rest by name (the
# `nnunet` extra); "torch==2.13.0" on the same line makes pip keep the installed torch or fail.
NNUNET_PACKAGES := nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
$(VENV)/.nnunet: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps $(NNUNET_PACKAGES)
	$(PY) -m pip install -q -e ".[dev,demo,nnunet]" "torch==2.13.0"
	$(PY) -c "import torch, nnunetv2.training.nnUNetTrainer.nnUNetTrainer; print('nnU-Net, torch', torch.__version__)"
	touch $@

nnunet: $(VENV)/.nnunet

test: venv nnunet
	$(PY) -m pytest -n $(WORKERS) -q

demo: venv
	$(PY) scripts/demo.py --out $(DEMO_OUT)

# the downstream experiment on the demo's models: it synthesises from the first training cases' masks (never a
# test case's), then trains segmenters, two at once (one thread each, both cores), each the way the demo trains its
# label-fidelity segmenter (gem3d.demo.SEGMENTER_OPTIONS, gem3d.segmentation.DEFAULT_ITERATIONS: 32 x 48 x 48
# patches, 450 iterations), over four seeds; DOWNSTREAM_ARGS adds or overrides flags (see --help; e.g. --jobs 1)
DOWNSTREAM_SEGMENTER := --iterations 450 --option 'patch=[32, 48, 48]' --seeds 0 1 2 3
DOWNSTREAM_ARGS ?=
downstream: venv
	$(PY) scripts/downstream.py --real $(DEMO_OUT)/dataset --out $(DEMO_OUT)/downstream \
		--synthetic $(DEMO_OUT)/downstream/synthetic --model gem3d=$(DEMO_OUT)/models/demo \
		--model base=$(DEMO_OUT)/models/demo_base --slice-model $(DEMO_OUT)/models/demo_slice --jobs 2 \
		$(DOWNSTREAM_SEGMENTER) $(DOWNSTREAM_ARGS)

BENCH_ARGS ?= --quick --threads 1

bench: venv
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) logs
