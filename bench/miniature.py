"""The miniature experiment (issue 5): GRPO vs TAPO and TAPO's ablations from the same cold-start
checkpoint, at equal steps and equal rollouts, over several seeds; held-out pass@1 mean ± std.

    .venv/bin/python bench/miniature.py --seeds 1 2 3 --steps 60 --arms grpo tapo --jobs 2
    .venv/bin/python bench/miniature.py --arms grpo tapo no_dae no_ots no_negative full

Each (arm, seed) is one ordinary run of ``tapo_ds/main.py`` with ``configs/quickstart.yaml``
plus the arm's switches. What is held equal across arms (the fairness rules):
- the initial model (the shipped cold-start checkpoint), the training questions (one prefilter
  pass, shared), the data order and rollout sampling per seed (same ``seed``);
- B x K rollouts per step and the number of optimizer steps; TAPO adds its construction
  generations on top, which is the method;
- the held-out evaluation: same problems, samples, temperature and max length, run once at
  the end of every run; the step-0 score is measured once (it is the same model for all).
Prints a table, writes ``results.json`` and ``pass_at_1.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CONFIG = ROOT / "configs" / "quickstart.yaml"

ARMS = {
    "grpo": ["algorithm.name=grpo"],
    "tapo": ["algorithm.name=tapo"],
    "no_dae": ["algorithm.name=tapo", "tapo.decoupled_advantages=false"],
    "no_ots": ["algorithm.name=tapo", "tapo.ots=false"],
    "no_negative": ["algorithm.name=tapo", "tapo.keep_failed_constructions=false"],
    "full": ["algorithm.name=tapo", "tapo.construction=full",
             "tapo.template=data/synthetic/construction_template_full.txt"],
    "splice": ["algorithm.name=tapo", "tapo.prefix=splice"],
    "dcs_222": ["algorithm.name=tapo", "tapo.n_pos=2", "tapo.n_neg=2", "tapo.m_max=2"],
    "dcs_153": ["algorithm.name=tapo", "tapo.n_pos=1", "tapo.n_neg=5", "tapo.m_max=3"],
}


def run(args: list[str], log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with log.open("w") as fh:
        proc = subprocess.run([PY, str(ROOT / "tapo_ds" / "main.py"), "--config", str(CONFIG)] + args,
                              cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"run failed ({proc.returncode}); see {log}")


def _finished(run_dir: Path, steps: int) -> bool:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return any(r["step"] == steps and "eval/test/pass@1" in r for r in rows)


def last_eval(run_dir: Path, key: str) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if key in r]
    if not values:
        raise SystemExit(f"{run_dir}: no {key} logged")
    return values[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["grpo", "tapo"], choices=sorted(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--questions", type=int, default=400, help="training questions given to the prefilter")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "miniature-bench")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (each then uses 1 torch thread)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    common = [f"--set=output_dir={a.out}", f"--set=total_steps={a.steps}", "--set=logging.progress_bar=false",
              "--set=checkpoint.every=0", "--set=checkpoint.export_hf=false"]

    filtered = a.out / "prefilter" / "filtered.jsonl"
    if not filtered.is_file():
        print(f"prefilter: {a.questions} questions x 8 samples with the cold-start checkpoint", flush=True)
        run(common + ["--set=stage=prefilter", "--set=name=prefilter", f"--set=data.limit={a.questions}"],
            a.out / "prefilter.log")
    train = f"--set=data.train_files=[{filtered}]"

    base_dir = a.out / "step0"
    if not (base_dir / "metrics.jsonl").is_file():  # the shared "before RL" score: 1 step at lr 0
        run(common + [train, "--set=name=step0", "--set=total_steps=1", "--set=optimizer.lr=0.0",
                      "--set=evaluation.at_start=true", "--set=evaluation.every=0"], a.out / "step0.log")
    rows = [json.loads(x) for x in (base_dir / "metrics.jsonl").read_text().splitlines()]
    before = next(r["eval/test/pass@1"] for r in rows if r["step"] == 0)

    threads = ["--set=torch_threads=1"] if a.jobs > 1 else []

    def one(arm_seed):
        arm, seed = arm_seed
        name = f"{arm}-s{seed}"
        if not (a.out / name / "metrics.jsonl").is_file() or not _finished(a.out / name, a.steps):
            t0 = time.time()
            run(common + threads + [train, f"--set=name={name}", f"--set=seed={seed}",
                                    "--set=evaluation.at_start=false", f"--set=evaluation.every={a.steps}"]
                + [f"--set={s}" for s in ARMS[arm]], a.out / f"{name}.log")
            print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
        return arm, last_eval(a.out / name, "eval/test/pass@1")

    from concurrent.futures import ThreadPoolExecutor

    jobs = [(arm, seed) for arm in a.arms for seed in a.seeds]
    results: dict[str, list[float]] = {arm: [] for arm in a.arms}
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        for arm, value in pool.map(one, jobs):  # map keeps the seed order within each arm
            results[arm].append(value)

    lines = [f"held-out pass@1 after {a.steps} steps (seeds {a.seeds}); before RL: {100 * before:.1f}%",
             "| arm | mean | std | per seed |", "|---|---|---|---|"]
    for arm, vals in results.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {arm} | {100 * statistics.mean(vals):.1f}% | {100 * sd:.1f} | "
                     f"{', '.join(f'{100 * v:.1f}' for v in vals)} |")
    table = "\n".join(lines)
    print(table)
    (a.out / "results.json").write_text(json.dumps({"before": before, "steps": a.steps, "seeds": a.seeds,
                                                    "pass@1": results}, indent=2))
    (a.out / "results.md").write_text(table + "\n")
    plot(results, before, a.out / "pass_at_1.png")


def plot(results: dict[str, list[float]], before: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results)
    means = [100 * statistics.mean(results[k]) for k in arms]
    sds = [100 * statistics.stdev(results[k]) if len(results[k]) > 1 else 0.0 for k in arms]
    fig, ax = plt.subplots(figsize=(1.2 * len(arms) + 2, 3.5))
    ax.bar(arms, means, yerr=sds, capsize=4, color="#4c72b0")
    for i, k in enumerate(arms):
        ax.scatter([i] * len(results[k]), [100 * v for v in results[k]], color="black", s=10, zorder=3)
    ax.axhline(100 * before, color="gray", linestyle="--", label="before RL")
    ax.set_ylabel("held-out pass@1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
