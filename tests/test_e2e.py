"""End to end through the real entry point: 1-rank run, resume, HF export, 2 ranks via the launcher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")

SMALL = [
    "total_steps=2", "rollout.questions_per_step=2", "rollout.samples_per_question=4",
    "rollout.max_new_tokens=12", "algorithm.micro_batch_size=4", "checkpoint.every=1",
    "logging.progress_bar=false", "reward.num_workers=1", "data.limit=16", "torch_threads=1",
    "tapo.n_pos=1", "tapo.n_neg=1", "tapo.max_new_tokens=16",
]


def run(args, tmp_path, name, extra=(), launcher=None, timeout=300):
    sets = [f"--set={s}" for s in SMALL + [f"output_dir={tmp_path}", f"name={name}"] + list(extra)]
    cmd = (launcher or [PY]) + [str(REPO / "tapo_ds" / "main.py"), "--config",
                                str(REPO / "configs" / "tiny.yaml")] + sets + list(args)
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["grpo", "tapo", "opsd"])
def test_run_resume_export(tmp_path, algorithm):
    run([], tmp_path, "a", [f"algorithm.name={algorithm}"])
    run_dir = tmp_path / "a"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    # OPSD's update is a divergence, not a clipped policy loss: no clip fraction, no entropy pass
    policy_loss_keys = ("actor/clip_frac", "actor/entropy") if algorithm != "opsd" else ()
    for key in ("rollout/reward_mean", "rollout/acc", "rollout/response_len_mean", "rollout/truncated_rate",
                "rollout/zero_std_group_frac", "actor/pg_loss", *policy_loss_keys, "actor/grad_norm",
                "actor/lr", "reward/timeout_rate", "reward/error_rate", "reward/no_box_rate", "reward/refused_rate",
                "timing/rollout", "timing/update", "perf/tokens_per_s"):
        assert key in rows[-1], key
    if algorithm == "tapo":
        assert "timing/construct" in rows[-1] and "tapo/pairs" in rows[-1]
    if algorithm == "opsd":  # the tiny config's rows carry a reference solution: every sample has a teacher
        assert rows[-1]["opsd/privileged_frac"] == 1.0 and rows[-1]["actor/grad_norm"] > 0
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.*"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    # resume: a 3-step run continued from step 2 logs only step 3
    run(["--resume", "auto"], tmp_path, "a", [f"algorithm.name={algorithm}", "total_steps=3"])
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = tok("What is 1 + 1?", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_resume_matches_uninterrupted(tmp_path):
    """Same data order and samples after a resume as in one uninterrupted run."""
    run([], tmp_path, "full", ["total_steps=3", "checkpoint.every=0"])
    run([], tmp_path, "split", ["total_steps=2"])
    run(["--resume", "auto"], tmp_path, "split", ["total_steps=3"])
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    for key in ("rollout/reward_mean", "rollout/response_len_mean"):
        assert [r[key] for r in full] == [r[key] for r in split], key
    assert full[-1]["actor/pg_loss"] == pytest.approx(split[-1]["actor/pg_loss"], rel=1e-4, abs=1e-6)

    # a fresh run into a folder that holds a run is refused before anything loads, naming the ways out
    cmd = [PY, str(REPO / "tapo_ds" / "main.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
           f"--set=output_dir={tmp_path}", "--set=name=full"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"config error: name: {tmp_path / 'full'} already holds a run (metrics.jsonl, checkpoints, tensorboard, hf); "
        f"continue it with --resume auto, pick another name (--set name=...), or start it over with "
        f"--set overwrite=true"]
    assert [r["step"] for r in metrics(tmp_path / "full")] == [1, 2, 3]


def test_two_ranks_zero3(tmp_path):
    """TAPO on 2 ZeRO-3 ranks from the shipped cold-start checkpoint, so constructions really fire and the
    ranks hold different numbers of samples (uneven micro-batch counts must stay in step); with the
    constructions inside the rollout, so the ranks also decode different numbers of steps, and verifying
    prompt-lookup drafts."""
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "tapo_ds" / "main.py"),
           "--config", str(REPO / "configs" / "quickstart.yaml")]
    for s in (f"output_dir={tmp_path}", "name=two", "total_steps=2", "data.limit=64", "evaluation.at_start=false",
              "evaluation.every=2", "evaluation.limit=8", "evaluation.samples=2", "evaluation.ks=[1,2]",
              "logging.progress_bar=false", "checkpoint.every=0", "torch_threads=1", "reward.num_workers=1",
              "deepspeed.config=ds_configs/zero3_cpu.json",
              "tapo.in_rollout=true", "tapo.lookup_draft_tokens=4"):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = metrics(tmp_path / "two")
    assert [r["step"] for r in rows] == [1, 2]
    assert "2 rank(s)" in proc.stdout + proc.stderr
    assert sum(r["tapo/constructed_samples"] for r in rows) > 0
    assert all("timing/grade_wait" in r for r in rows)
    assert 0 < sum(r["tapo/draft_accepted"] for r in rows) <= sum(r["tapo/draft_tokens"] for r in rows)
    assert "eval/test/pass@2" in rows[-1]


def test_config_error_is_one_line(tmp_path):
    cmd = [PY, str(REPO / "tapo_ds" / "main.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
           "--set", "rollout.temprature=0.5"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: rollout.temprature: unknown key (did you mean 'temperature'?); known: questions_per_step, "
        "samples_per_question, max_new_tokens, temperature, top_p, top_k, gather, engine, dynamic_sampling, "
        "dynamic_sampling_max_rounds"]


def test_bad_data_and_checkpoint_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "no answer"}\n')
    for extra, expected in (([f"--set=data.train_files=[{bad}]"], f"DataError: {bad}:2: missing or empty field 'answer'"),
                            (["--resume", str(tmp_path / "nope")], "CheckpointError: --resume")):
        cmd = [PY, str(REPO / "tapo_ds" / "main.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
               f"--set=output_dir={tmp_path}"] + extra
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr[-2000:]
