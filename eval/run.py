"""The paper's evaluation protocol over one checkpoint (docs/method.md §Evaluation).

AIME 2024, AIME 2025 and HMMT February 2025; temperature 0.6, top-p 0.9 (the task
YAMLs); n samples per problem and `runs` runs with seeds seed, seed+1, ...; Pass@1…5
with the unbiased estimator. The paper's "5 samples, averaged over 16 runs" is
`--n 5 --runs 16`; the default `--n 80 --runs 1` estimates the same quantities from the
same number of samples in one pass. Each task's numbers are the mean over runs (and the
standard deviation across runs when there are several).

    python -m eval.run --model_args pretrained=CKPT --output_dir runs/eval/CKPT

writes results.json, results.md (the table, also printed) and pass_at_k.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

from eval import BENCHMARKS, TASKS_DIR
from eval.metrics import PASS_KS

DEFAULT_MAX_GEN_TOKS = 32768
FILTER = "all_samples"
EXTRA_METRICS = ("avg@n", "maj@n", "no_box")
# Backends whose chat template takes `enable_thinking` (Qwen3); the paper evaluates in
# non-thinking mode, so the runner asks for it unless the model args say otherwise.
THINKING_SWITCH_MODELS = {"hf", "hf-auto", "huggingface", "vllm"}

log = logging.getLogger("eval.run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="hf", help="lm-eval model type: hf (default) or vllm")
    p.add_argument(
        "--model_args",
        required=True,
        help="lm-eval model args, e.g. pretrained=/path/to/checkpoint,dtype=bfloat16",
    )
    p.add_argument("--tasks", default=",".join(BENCHMARKS), help="comma-separated task names")
    p.add_argument("--n", type=int, default=80, help="samples per problem per run")
    p.add_argument("--runs", type=int, default=1, help="runs, seeded seed, seed+1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run")
    p.add_argument(
        "--max_gen_toks",
        type=int,
        default=DEFAULT_MAX_GEN_TOKS,
        help=f"maximum generated tokens per sample (default {DEFAULT_MAX_GEN_TOKS})",
    )
    p.add_argument(
        "--gen_kwargs",
        default="",
        help="further generation overrides, lm-eval syntax: temperature=0.6,top_p=0.9",
    )
    p.add_argument("--limit", type=int, default=None, help="first N problems of each task (smoke tests)")
    p.add_argument("--batch_size", default="1")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--no_chat_template",
        action="store_true",
        help="feed the raw prompt instead of applying the model's chat template",
    )
    p.add_argument(
        "--data_dir",
        default=None,
        help="read <task>.jsonl from here instead of the hub (sets TAPO_EVAL_DATA_DIR)",
    )
    p.add_argument("--output_dir", required=True, type=Path)
    args = p.parse_args(argv)
    if args.n < 1 or args.runs < 1:
        p.error("--n and --runs must be at least 1")
    if args.max_gen_toks < 1:
        p.error("--max_gen_toks must be at least 1")
    return args


def build_lm(model: str, model_args: str, batch_size: str, device: str | None, chat: bool):
    from lm_eval.api.registry import get_model
    from lm_eval.utils import simple_parse_args_string

    if chat and model in THINKING_SWITCH_MODELS and "enable_thinking" not in model_args:
        model_args = ",".join(a for a in (model_args, "enable_thinking=False") if a)
    log.info("model %s with %s", model, model_args)
    extra = {"batch_size": batch_size, "device": device}
    lm = get_model(model).create_from_arg_obj(simple_parse_args_string(model_args), extra)
    return lm, model_args


def run_once(lm, manager, tasks: list[str], n: int, seed: int, gen_kwargs: dict, limit, chat: bool):
    """One lm-eval run of `tasks` (a group stands for its tasks) with `n` samples per
    problem; returns {task: {"metrics": {name: value}, "problems": int,
    "generation_kwargs": dict}}."""
    import lm_eval

    loaded = manager.load(tasks)["tasks"]
    for task in loaded.values():
        task.set_config("repeats", n)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(loaded.values()),
        task_manager=manager,
        limit=limit,
        gen_kwargs=gen_kwargs,
        apply_chat_template=chat,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    per_task = {}
    for name in loaded:
        row = out["results"][name]
        per_task[name] = {
            "metrics": {
                m: row[f"{m},{FILTER}"]
                for m in [f"pass@{k}" for k in PASS_KS] + list(EXTRA_METRICS)
                if f"{m},{FILTER}" in row
            },
            "problems": int(row["sample_len"]),
            "generation_kwargs": out["configs"][name]["generation_kwargs"],
        }
    return per_task


def summarize_runs(runs: list[dict]) -> dict:
    """{task: {metric: {"mean", "std"}}} over runs, plus a "mean" pseudo-task (the plain
    mean over tasks, as the paper averages its benchmarks)."""
    summary: dict[str, dict] = {}
    for task in runs[0]:
        summary[task] = {}
        for metric in runs[0][task]["metrics"]:
            values = [r[task]["metrics"][metric] for r in runs]
            summary[task][metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    if len(summary) > 1:
        common = set.intersection(*(set(m) for m in summary.values()))
        summary["mean"] = {
            metric: {
                "mean": statistics.fmean(summary[t][metric]["mean"] for t in runs[0]),
                "std": None,
            }
            for metric in sorted(common)
        }
    return summary


def _cell(stat: dict | None, runs: int) -> str:
    if stat is None:
        return "–"
    text = f"{100 * stat['mean']:.2f}"
    if runs > 1 and stat["std"] is not None:
        text += f" ± {100 * stat['std']:.2f}"
    return text


def markdown_table(summary: dict, protocol: dict) -> str:
    ks = [k for k in PASS_KS if k <= protocol["n"]]
    runs = protocol["runs"]
    head = (
        f"Pass@k (%), {protocol['n']} samples per problem × {runs} run(s), "
        f"temperature {protocol['temperature']}, top-p {protocol['top_p']}, "
        f"max generation length {protocol['max_gen_toks']} tokens"
        + (f", first {protocol['limit']} problems only" if protocol["limit"] else "")
        + (" (mean ± std over runs)" if runs > 1 else "")
        + "."
    )
    cols = [f"Pass@{k}" for k in ks] + ["maj@n", "no box", "max_gen_toks"]
    lines = [
        head,
        "",
        "| Benchmark | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for task, stats in summary.items():
        cells = [_cell(stats.get(f"pass@{k}"), runs) for k in ks]
        cells += [_cell(stats.get("maj@n"), runs), _cell(stats.get("no_box"), runs)]
        cells.append(str(protocol["max_gen_toks"]))
        name = "**mean**" if task == "mean" else task
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, protocol: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [k for k in PASS_KS if k <= protocol["n"]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for task, stats in summary.items():
        if task == "mean":
            continue
        ys = [100 * stats[f"pass@{k}"]["mean"] for k in ks]
        errs = [100 * stats[f"pass@{k}"]["std"] for k in ks]
        if protocol["runs"] > 1:
            ax.errorbar(ks, ys, yerr=errs, marker="o", capsize=3, label=task)
        else:
            ax.plot(ks, ys, marker="o", label=task)
    ax.set_xlabel("k")
    ax.set_ylabel("Pass@k (%)")
    ax.set_xticks(ks)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(
        f"n={protocol['n']}×{protocol['runs']}, T={protocol['temperature']}, "
        f"top-p={protocol['top_p']}, max_gen_toks={protocol['max_gen_toks']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.data_dir:
        os.environ["TAPO_EVAL_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    gen_kwargs = {"max_gen_toks": args.max_gen_toks, **simple_parse_args_string(args.gen_kwargs)}
    chat = not args.no_chat_template

    lm, model_args = build_lm(args.model, args.model_args, args.batch_size, args.device, chat)
    # Only this package's tasks: indexing lm-eval's built-in tasks as well takes ~20 s.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    seeds = [args.seed + i for i in range(args.runs)]
    runs = []
    for seed in seeds:
        log.info("run with seed %d: %s, n=%d", seed, ",".join(tasks), args.n)
        runs.append(run_once(lm, manager, tasks, args.n, seed, gen_kwargs, args.limit, chat))

    effective = next(iter(runs[0].values()))["generation_kwargs"]
    protocol = {
        "model": args.model,
        "model_args": model_args,
        "tasks": tasks,
        "n": args.n,
        "runs": args.runs,
        "seeds": seeds,
        "max_gen_toks": effective["max_gen_toks"],
        "temperature": effective.get("temperature"),
        "top_p": effective.get("top_p"),
        "generation_kwargs": effective,
        "chat_template": chat,
        "limit": args.limit,
        "data_dir": os.environ.get("TAPO_EVAL_DATA_DIR"),
    }
    summary = summarize_runs(runs)
    table = markdown_table(summary, protocol)

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    report = {"protocol": protocol, "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(table)
    plot(summary, protocol, out / "pass_at_k.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'pass_at_k.png'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
