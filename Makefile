# One-command setup: `make quickstart` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: quickstart test bench venv clean

venv: $(STAMP)

# torch first, from the local CPU wheel: anything that pulled a newer torch would fetch a CUDA build.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $@

quickstart: $(STAMP)
	$(VENV)/bin/deepspeed tapo_ds/main.py --config configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/rollout.py
	$(PY) bench/tapo_overhead.py

clean:
	rm -rf runs .pytest_cache
