"""tapo-ds GRPO against TRL's GRPOTrainer at identical settings, side by side on this machine.

    .venv/bin/python bench/vs_trl.py                 # both models, 2 rounds (about 10 minutes on 2 cores)
    .venv/bin/python bench/vs_trl.py --models miniature --rounds 1 --steps 4

TRL (``trl==1.16.0``, torch 2.13.0 first, the same transformers) is installed on first use into its own
venv, ``.cache/trl-venv``. Each round runs the two systems one after the other on each model, with the
same model folder, the same questions (the first ``--pool`` rows of the synthetic training set),
the chat-template prompt ``{problem}``, B questions x K samples per step, ``max_new_tokens``, temperature
1.0, top-p 1.0, beta 0 (no KL, no reference model), lr 5e-5 constant, one optimizer step per rollout,
PPO clip 0.2, group-normalised advantages, seq-mean-token-mean loss, 2 torch threads; gradient checkpointing
each system's default (tapo-ds off, TRL on) unless ``--gradient-checkpointing on|off`` sets both. tapo-ds runs
its default config (configs/quickstart.yaml: ZeRO-2 under DeepSpeed, one process, no launcher). The first step of
each run is warm-up and left out. Printed per system and model: median step time, peak RSS of the process tree, mean
response length and reward (both ran the same regime), then the ratio tapo-ds / TRL of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = ROOT / ".cache" / "trl-venv"
TRL_PY = TRL_VENV / "bin" / "python"
CACHE = ROOT / ".cache" / "vs_trl"


def ensure_trl() -> None:
    if TRL_PY.is_file() and subprocess.run([str(TRL_PY), "-c", "import trl"], capture_output=True).returncode == 0:
        return
    print(f"installing TRL into {TRL_VENV} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(TRL_PY), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # first: the CPU wheel, nothing pulls a CUDA build
    import transformers

    subprocess.run(pip + ["trl==1.16.0", f"transformers=={transformers.__version__}"], check=True)


def model_folder(name: str) -> Path:
    if name == "miniature":
        return ROOT / "checkpoints" / "miniature-coldstart"
    out = CACHE / "qwen30m"
    if not (out / "config.json").is_file():
        from tapo_ds.modeling import build_tiny_model_and_tokenizer

        model, tok = build_tiny_model_and_tokenizer(seed=0, hidden_size=512, intermediate_size=1536,
                                                    num_hidden_layers=8, num_attention_heads=8,
                                                    num_key_value_heads=4, head_dim=64)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def questions_file(n: int) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"questions{n}.jsonl"
    rows = (ROOT / "data" / "synthetic" / "train.jsonl").read_text().splitlines()[:n]
    out.write_text("\n".join(rows) + "\n")
    return out


def timed_child(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak RSS in GB of the largest process of its tree)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        # wait4: the child's own rusage, whose ru_maxrss covers it and the descendants it waited for
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{log.read()[-5000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20


def run_tapo(model: Path, data: Path, a, tmp: Path, env: dict) -> dict:
    name = f"vs_trl_{model.name}"
    sets = [f"model.path={model}", f"data.train_files=[{data}]", "algorithm.name=grpo", f"total_steps={a.steps}",
            f"rollout.questions_per_step={a.questions}", f"rollout.samples_per_question={a.samples}",
            f"rollout.max_new_tokens={a.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
            "optimizer.lr=5e-5", "optimizer.warmup_steps=0", "optimizer.schedule=constant", "algorithm.kl_coef=0",
            "algorithm.micro_batch_size=64", "evaluation.every=0", "evaluation.at_start=false",
            "checkpoint.every=0", "checkpoint.export_hf=false", "logging.progress_bar=false",
            "logging.tensorboard=false", "logging.text_every=0", "torch_threads=2", f"output_dir={tmp}",
            f"name={name}", "overwrite=true", f"seed={a.seed}"]
    if a.gradient_checkpointing != "defaults":
        sets.append(f"model.gradient_checkpointing={str(a.gradient_checkpointing == 'on').lower()}")
    sets += a.tapo_set
    cmd = [sys.executable, "tapo_ds/main.py", "--config", "configs/quickstart.yaml"]
    cmd += [x for s in sets for x in ("--set", s)]
    wall, rss = timed_child(cmd, env)
    rows = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "timing/step" in r][1:]
    return {"step_s": [r["timing/step"] for r in rows], "response_len_mean": [r["rollout/response_len_mean"] for r in rows],
            "reward": [r["rollout/reward_mean"] for r in rows], "rss_gb": rss, "wall_s": wall,
            "phases": {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("timing/")}}


def run_trl(model: Path, data: Path, a, tmp: Path, env: dict) -> dict:
    out = tmp / f"trl_{model.name}.json"
    cmd = [str(TRL_PY), "bench/_trl_grpo.py", "--model", str(model), "--data", str(data), "--steps", str(a.steps),
           "--questions", str(a.questions), "--samples", str(a.samples), "--max-new-tokens", str(a.max_new_tokens),
           "--seed", str(a.seed), "--out", str(out)]
    if a.gradient_checkpointing != "defaults":
        cmd += ["--gradient-checkpointing", a.gradient_checkpointing]
    wall, rss = timed_child(cmd, env)
    res = json.loads(out.read_text())
    return {"step_s": res["step_s"][1:], "response_len_mean": res["response_len_mean"][1:],
            "reward": res["reward"][1:], "rss_gb": rss, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["miniature", "qwen30m"], choices=["miniature", "qwen30m"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--questions", type=int, default=8, help="B")
    p.add_argument("--samples", type=int, default=8, help="K")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--pool", type=int, default=200, help="questions to draw from")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gradient-checkpointing", choices=["defaults", "on", "off"], default="defaults",
                   help="defaults: each system's own (tapo-ds off, TRL on); on/off: both the same")
    p.add_argument("--tapo-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for tapo-ds's runs only, e.g. deepspeed.config=ds_configs/zero2_cpu.json")
    a = p.parse_args()
    ensure_trl()
    data = questions_file(a.pool)
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for r in range(a.rounds):
            for m in a.models:
                folder = model_folder(m)
                for system, fn in (("tapo-ds", run_tapo), ("trl", run_trl)):
                    res = fn(folder, data, a, tmp, env)
                    results.setdefault((m, system), []).append(res)
                    print(f"round {r + 1} {m:9s} {system:7s} median step {statistics.median(res['step_s']):.3f} s  "
                          f"peak RSS {res['rss_gb']:.2f} GB  length {statistics.mean(res['response_len_mean']):.1f}  "
                          f"reward {statistics.mean(res['reward']):.3f}", flush=True)
    print(f"\nB={a.questions} K={a.samples} max_new_tokens={a.max_new_tokens}, {a.steps - 1} timed steps per run, "
          f"{a.rounds} round(s), gradient checkpointing: {a.gradient_checkpointing}; medians over all timed steps "
          f"of all rounds; tapo-ds overrides: {a.tapo_set or 'none'}")
    print("| model | system | step time (s) | peak RSS (GB) | response length | reward |")
    print("|---|---|---|---|---|---|")
    for m in a.models:
        med = {}
        for system in ("tapo-ds", "trl"):
            runs = results[(m, system)]
            steps = [t for res in runs for t in res["step_s"]]
            med[system] = statistics.median(steps)
            rss = max(res["rss_gb"] for res in runs)
            length = statistics.mean(x for res in runs for x in res["response_len_mean"])
            reward = statistics.mean(x for res in runs for x in res["reward"])
            print(f"| {m} | {system} | {med[system]:.3f} | {rss:.2f} | {length:.1f} | {reward:.3f} |")
        phases = results[(m, "tapo-ds")][-1]["phases"]
        print(f"| {m} | tapo-ds phases | " + ", ".join(f"{k[7:]} {v:.3f}" for k, v in sorted(phases.items())) + " | | | |")
    for m in a.models:
        print(f"ratio tapo-ds / TRL step time ({m}): "
              f"{statistics.median(t for res in results[(m, 'tapo-ds')] for t in res['step_s']) / statistics.median(t for res in results[(m, 'trl')] for t in res['step_s']):.2f}")


if __name__ == "__main__":
    main()
