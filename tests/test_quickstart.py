"""The quickstart pipeline (prefilter -> TAPO -> before/after report) at a reduced size, from the
shipped cold-start checkpoint, through the same commands `make quickstart` runs."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "quickstart.yaml")
SMALL = ["rollout.questions_per_step=4", "rollout.max_new_tokens=64", "tapo.max_new_tokens=128",
         "evaluation.limit=8", "evaluation.samples=2", "evaluation.ks=[1,2]", "evaluation.every=2",
         "logging.progress_bar=false", "reward.num_workers=1", "checkpoint.every=0"]


def main_py(tmp_path, *sets, timeout=400):
    cmd = [sys.executable, str(REPO / "tapo_ds" / "main.py"), "--config", CONFIG]
    for s in SMALL + [f"output_dir={tmp_path}"] + list(sets):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_quickstart_pipeline_reduced(tmp_path):
    pre = main_py(tmp_path, "stage=prefilter", "name=pre", "data.limit=24", "prefilter.samples=4")
    assert "pass-rate histogram (24 questions x 4 samples)" in pre.stdout
    filtered = tmp_path / "pre" / "filtered.jsonl"
    kept = filtered.read_text().splitlines()
    for row in map(json.loads, kept):
        assert 0.125 <= row["pass_rate"] <= 0.875
    train = filtered if kept else REPO / "data" / "synthetic" / "train.jsonl"
    main_py(tmp_path, f"data.train_files=[{train}]", "name=qs", "total_steps=2")
    rows = [json.loads(x) for x in (tmp_path / "qs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/test/pass@1" in rows[0]  # before RL
    assert rows[-1]["step"] == 2 and "eval/test/pass@2" in rows[-1]  # after
    assert "tapo/selected_frac" in rows[1]
    report = subprocess.run([sys.executable, "-m", "tapo_ds.report", str(tmp_path / "qs")], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert report.returncode == 0 and "| test/pass@1 |" in report.stdout and "(before)" in report.stdout
