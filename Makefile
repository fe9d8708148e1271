# One-command setup: `make quickstart` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: quickstart coldstart test lint bench venv clean

venv: $(STAMP)

# torch first, from the local CPU wheel: anything that pulled a newer torch would fetch a CUDA build.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The miniature: prefilter the synthetic questions with the shipped cold-start checkpoint, TAPO on the
# kept ones (held-out pass@k before and after), then the before/after table.
QUICKSTART_QUESTIONS ?= 400
quickstart: $(STAMP)
	$(VENV)/bin/deepspeed tapo_ds/main.py --config configs/quickstart.yaml --set stage=prefilter \
		--set name=quickstart-prefilter --set data.limit=$(QUICKSTART_QUESTIONS) --set overwrite=true
	$(VENV)/bin/deepspeed tapo_ds/main.py --config configs/quickstart.yaml \
		--set "data.train_files=[runs/quickstart-prefilter/filtered.jsonl]" --set overwrite=true
	$(PY) -m tapo_ds.report runs/quickstart

# Rebuild the shipped cold-start checkpoint (about 40 minutes on 2 cores): the synthetic data (RL train/test
# and the cold-start mix, whose construction rows use the `parted` analysis and slip after the reflection in
# 40 % of them; train.jsonl keeps off the mix's problems), SFT from scratch, then the copy of its HF export.
# bench/results/miniature_calibration.md has every mix tried and why this one.
COLDSTART_DATA := --out data/synthetic --train 3000 --test 200 --seed 0 --steps 3 6 \
	--max-value 999 --coldstart-steps 2 6 --coldstart-first --coldstart 44000 \
	--mix gold=0.23,sft=0.03,ift=0.74 --analysis parted --no-examples --slip-rate 0.4
coldstart: $(STAMP)
	$(PY) -m tapo_ds.synthetic make-data $(COLDSTART_DATA)
	$(VENV)/bin/deepspeed tapo_ds/main.py --config configs/miniature/coldstart.yaml --set overwrite=true
	rm -rf checkpoints/miniature-coldstart && cp -r runs/miniature-coldstart/hf checkpoints/miniature-coldstart

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/rollout.py
	$(PY) bench/tapo_overhead.py

clean:
	rm -rf runs .pytest_cache
