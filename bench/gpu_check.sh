#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA device (under 5 minutes): the GPU-marked tests, the tiny
# config for 3 TAPO steps in bf16 under ZeRO-3 on CUDA, bench/rollout.py on CUDA, then a short table.
#   bash bench/gpu_check.sh            (from the repository root, after `make venv`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
$PY -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

echo "== GPU-marked tests"
$PY -m pytest -q -m gpu tests 2>&1 | tail -3 | tee "$OUT/tests.txt"

echo "== tiny config, 3 TAPO steps, bf16, ZeRO-3 on CUDA"
.venv/bin/deepspeed --num_gpus 1 tapo_ds/main.py --config configs/tiny.yaml --set algorithm.name=tapo \
  --set model.dtype=bfloat16 --set deepspeed.config=ds_configs/zero3_gpu.json --set total_steps=3 \
  --set evaluation.every=0 --set checkpoint.every=0 --set checkpoint.export_hf=false \
  --set logging.progress_bar=false --set output_dir="$OUT" --set name=tiny_bf16 --set overwrite=true \
  > "$OUT/tiny_bf16.log" 2>&1 || { tail -40 "$OUT/tiny_bf16.log"; exit 1; }

echo "== bench/rollout.py on CUDA"
$PY bench/rollout.py > "$OUT/rollout.txt" 2>&1 || { tail -40 "$OUT/rollout.txt"; exit 1; }

$PY - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "tiny_bf16" / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in rows if "timing/step" in r]
later = steps[1:] or steps  # step 1 includes warm-up
print("\n| measure | value |\n|---|---|")
print(f"| GPU tests | {(out / 'tests.txt').read_text().strip().splitlines()[-1]} |")
print(f"| tiny TAPO step time, median of steps 2-3 | {statistics.median(r['timing/step'] for r in later):.3f} s |")
print(f"| tiny rollout tokens/s, median | {statistics.median(r['perf/tokens_per_s'] for r in later):.0f} |")
print(f"| tiny peak GPU memory | {max(r.get('perf/peak_gpu_mem_gb', float('nan')) for r in steps):.2f} GiB |")
for line in (out / "rollout.txt").read_text().splitlines():
    if line.startswith(("median", "ratio")):
        print(f"| bench/rollout.py: {line.split(':')[0].strip()} | {line.split(':', 1)[-1].strip() if ':' in line else line} |")
PY
