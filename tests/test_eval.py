"""Tests for the evaluation package (eval/): offline, CPU.

The metrics against brute force; the tasks loading through --include_path (overriding
lm-eval's built-ins) from jsonl files written here; a scripted model whose answers are
fixed, run through lm-eval, giving exactly the brute-force pass@1…5 with every sample
scored; grading identical to tapo_ds.reward.math_equal; the protocol runner's outputs;
and one real `lm_eval --model hf` run on a tiny random model built here.

`python -m tests.test_eval DIR`, run from the repository root, builds that tiny model
into DIR (for eval/README.md's offline smoke command).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import subprocess_env

from eval import BENCHMARKS, TASKS_DIR
from eval.metrics import PASS_KS, majority_vote, pass_at_k, summarize

# ----------------------------------------------------------------------- helpers


def build_tiny_model(out_dir, seed: int = 0) -> Path:
    """The project's tiny Qwen3 (random weights, local tokenizer) as an HF folder lm-eval can load."""
    from tapo_ds.modeling import build_tiny_model_and_tokenizer, export_hf

    model, tokenizer = build_tiny_model_and_tokenizer(seed=seed, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=2,
                                                      num_key_value_heads=1, head_dim=16)
    return export_hf(model, tokenizer, out_dir)


def brute_pass_at_k(correct: list[bool], k: int) -> Fraction:
    """Fraction of the k-subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return Fraction(sum(any(correct[i] for i in s) for s in subsets), len(subsets))


def brute_majority(answers: list[str | None], equivalent) -> list[set[int]]:
    """Clusters of answered samples under the transitive closure of `equivalent`."""
    idx = [i for i, a in enumerate(answers) if a is not None and a.strip()]
    parent = {i: i for i in idx}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(idx, 2):
        if equivalent(answers[i], answers[j]):
            parent[find(i)] = find(j)
    groups: dict[int, set[int]] = {}
    for i in idx:
        groups.setdefault(find(i), set()).add(i)
    return list(groups.values())


def expected_maj(answers, correct, equivalent) -> float:
    clusters = brute_majority(answers, equivalent)
    if not clusters:
        return 0.0
    top = max(len(c) for c in clusters)
    winners = [c for c in clusters if len(c) == top]
    right = [c for c in winners if any(correct[i] for i in c)]
    return len(right) / len(winners)


# Data the tests write into $TAPO_EVAL_DATA_DIR, and the scripted model's 5 answers per
# problem with their hand labels (True = correct). The labels are checked against
# tapo_ds.reward.math_equal below, and the expected metrics are computed from them by
# brute force.
BOX_204 = "Adding the two times gives 204, so the walk takes \\boxed{204} minutes."
SCRIPT = {
    "aime24": [
        (
            "a24-1",
            "204",
            [
                (BOX_204, True),
                ("So the answer is \\boxed{205}.", False),
                ("The answer is 204.", False),  # right number, no box: scores 0
                ("First \\boxed{204}, but rechecking, \\boxed{240}.", False),  # last box counts
                ("\\boxed{204}", True),
            ],
        ),
        (
            "a24-2",
            "113",
            # two right, three wrong that are one answer written three ways: maj@n = 0
            [
                ("\\boxed{113}", True),
                ("\\boxed{0.5}", False),
                ("\\boxed{\\frac{1}{2}}", False),
                ("Thus $x = \\boxed{113}$.", True),
                ("\\boxed{1/2}", False),
            ],
        ),
        (
            "a24-3",
            "25",
            [("\\boxed{}", False), ("no idea", False), ("\\boxed{26}", False)] * 2,
        ),
    ],
    "aime25": [
        (
            "a25-1",
            "70",
            # two right, two equal wrong, one without box: a tie, maj@n = 1/2
            [
                ("\\boxed{70}", True),
                ("\\boxed{7}", False),
                ("\\boxed{70}", True),
                ("\\boxed{7}", False),
                ("", False),
            ],
        ),
        ("a25-2", "588", [("\\boxed{588}", True)] * 5),
    ],
    "hmmt25": [
        (
            "h25-1",
            "\\frac{1}{2}",
            [
                ("\\boxed{\\dfrac{1}{2}}", True),
                ("\\boxed{0.5}", True),
                ("\\boxed{\\frac{2}{3}}", False),
                ("\\boxed{1/3}", False),
                ("\\boxed{\\frac{1}{3}}", False),
            ],
        ),
        (
            "h25-2",
            "2\\sqrt{3}",
            [
                ("\\boxed{2\\sqrt{3}}", True),
                ("\\boxed{\\sqrt{12}}", True),
                ("\\boxed{3\\sqrt{2}}", False),
                ("\\boxed{2\\sqrt{3}", False),  # unclosed box: no answer
                ("\\boxed{4}", False),
            ],
        ),
    ],
}
# SCRIPT["aime24"][2] has 6 answers; the model cycles through a problem's list.


def problem_text(pid: str) -> str:
    return f"Problem {pid}: compute the quantity asked for in problem {pid}."


def write_data(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    for task, problems in SCRIPT.items():
        with (data_dir / f"{task}.jsonl").open("w") as fh:
            for pid, gold, _ in problems:
                fh.write(json.dumps({"id": pid, "problem": problem_text(pid), "answer": gold}) + "\n")
    return data_dir


def scripted_responses(pid: str, n: int) -> list[str]:
    for problems in SCRIPT.values():
        for p, _, answers in problems:
            if p == pid:
                return [answers[i % len(answers)][0] for i in range(n)]
    raise KeyError(pid)


def expected_task_metrics(task: str, n: int) -> dict[str, float]:
    """pass@k by k-subset enumeration, and the other metrics by their definitions,
    from the hand labels, averaged over the task's problems."""
    from eval.tasks.utils import grade
    from tapo_ds.reward import math_equal

    per_problem = []
    for pid, _gold, answers in SCRIPT[task]:
        labels = [answers[i % len(answers)][1] for i in range(n)]
        responses = scripted_responses(pid, n)
        extracted = [grade(r, _gold)[0] for r in responses]
        row = {f"pass@{k}": float(brute_pass_at_k(labels, k)) for k in PASS_KS if k <= n}
        row["avg@n"] = sum(labels) / n
        row["no_box"] = sum(a is None for a in extracted) / n
        row["maj@n"] = expected_maj(extracted, labels, math_equal)
        per_problem.append(row)
    return {m: sum(r[m] for r in per_problem) / len(per_problem) for m in per_problem[0]}


# ------------------------------------------------------------- the scripted model

from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import model_registry, register_model  # noqa: E402


class ScriptedLM(LM):
    """Answers each problem with its SCRIPT responses, in order, cycling; records
    what it was asked."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, **kwargs) -> None:
        super().__init__()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        seen: dict[int, int] = {}
        out = []
        for req in requests:
            i = seen.get(id(req), 0)
            seen[id(req)] = i + 1
            context, gen_kwargs = req.args
            ScriptedLM.calls.append((context, dict(gen_kwargs)))
            out.append(scripted_responses(req.doc["id"], i + 1)[i])
        return out

    @property
    def tokenizer_name(self) -> str:
        return "scripted"

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in chat_history)

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


import lm_eval.models  # noqa: E402, F401  (fill the registry first: it loads lazily only while empty)

if "tapo_scripted" not in model_registry:
    register_model("tapo_scripted")(ScriptedLM)


# ------------------------------------------------------------------------- tests


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 9):
        for c in range(n + 1):
            labels = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(labels, k)))
    assert pass_at_k(80, 20, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_vote_groups_equivalent_answers_and_splits_ties():
    same_value = {"1/2": 0.5, "0.5": 0.5, "\\frac12": 0.5, "7": 7.0, "8": 8.0}

    def eq(a, b):
        return same_value[a] == same_value[b]

    # three wrong answers that are one value beat two right ones
    assert majority_vote(["3", "0.5", "1/2", "3", "\\frac12"], [1, 0, 0, 1, 0], eq) == 0.0
    # without the grouping the right answer would have won
    assert majority_vote(["3", "0.5", "7", "3", "8"], [1, 0, 0, 1, 0], eq) == 1.0
    # tie between the right cluster and one wrong cluster: expected credit 1/2
    assert majority_vote(["3", "7", "3", "7", None], [1, 0, 1, 0, 0], eq) == 0.5
    # samples without an answer (no box, empty box) do not vote
    assert majority_vote(["3", None, "", " ", None], [1, 0, 0, 0, 0], eq) == 1.0
    assert majority_vote([None] * 3, [0, 0, 0], eq) == 0.0
    assert majority_vote(["7", "8"], [0, 0], eq) == 0.0

    metrics = summarize(["3", None, "7", "3", "3"], [True, False, False, True, True], eq)
    assert metrics["avg@n"] == pytest.approx(0.6)
    assert metrics["no_box"] == pytest.approx(0.2)
    assert metrics["pass@5"] == 1.0 and "pass@6" not in metrics
    assert summarize(["3", "7"], [True, False], eq).keys() == {"pass@1", "pass@2", "avg@n", "maj@n", "no_box"}


def test_grading_is_the_trainers_math_equal():
    from eval.tasks.utils import grade
    from tapo_ds.reward import last_boxed, math_equal

    for task, problems in SCRIPT.items():
        for pid, gold, answers in problems:
            for response, label in answers:
                answer, ok = grade(response, gold)
                assert answer == last_boxed(response)
                if answer is None or not answer.strip():
                    assert not ok, response
                else:
                    assert ok == math_equal(response, gold), response
                assert ok == label, (task, pid, response)


def test_tasks_override_builtins_and_load_offline(tmp_path, monkeypatch, caplog):
    """--include_path eval/tasks replaces lm-eval's own aime24/aime25 (indexed first,
    then overridden by later paths, with a warning) and adds hmmt25 and tapo_math."""
    from lm_eval.tasks import TaskManager

    from tapo_ds.config import DataConfig

    trainer_prompt = DataConfig().prompt_template
    assert "\\boxed{}" in trainer_prompt
    monkeypatch.setenv("TAPO_EVAL_DATA_DIR", str(write_data(tmp_path / "data")))
    with caplog.at_level("WARNING", logger="lm_eval.tasks._index"):
        manager = TaskManager(include_path=str(TASKS_DIR))  # the full index, as the CLI builds it
    for name in ("aime24", "aime25"):
        assert any(
            f"Task '{name}' from {TASKS_DIR / name}.yaml overrides existing task from" in r.message
            and "lm_eval/tasks/aime/" in r.message
            for r in caplog.records
        ), name
    for name in BENCHMARKS:
        assert Path(manager.task_index[name].yaml_path) == TASKS_DIR / f"{name}.yaml"
    assert Path(manager.task_index["tapo_math"].yaml_path) == TASKS_DIR / "tapo_math.yaml"

    loaded = manager.load(["tapo_math"])
    assert set(loaded["tasks"]) == set(BENCHMARKS)
    for name, task in loaded["tasks"].items():
        docs = list(task.eval_docs)
        assert [d["id"] for d in docs] == [pid for pid, _, _ in SCRIPT[name]]
        assert [d["answer"] for d in docs] == [gold for _, gold, _ in SCRIPT[name]]
        # the trainer's default prompt, so evaluation asks what training asked
        assert task.doc_to_text(docs[0]) == trainer_prompt.replace("{problem}", docs[0]["problem"])
        cfg = task.config
        assert cfg.repeats == 5
        gen = cfg.generation_kwargs
        assert (gen["do_sample"], gen["temperature"], gen["top_p"]) == (True, 0.6, 0.9)
        assert gen["max_gen_toks"] == 32768


def test_data_errors_name_the_file(tmp_path, monkeypatch):
    from eval.tasks.utils import load_benchmark

    kwargs = dict(hub_path="x", hub_split="train", hub_problem_field="p", hub_answer_field="a")
    monkeypatch.setenv("TAPO_EVAL_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="aime24.jsonl"):
        load_benchmark("aime24", **kwargs)
    (tmp_path / "aime25.jsonl").write_text('{"id": "1", "problem": "p", "answer": "3"}\n{"id": "2", "problem": "q"}\n')
    with pytest.raises(ValueError, match=r"aime25.jsonl:2: missing field\(s\) \['answer'\]"):
        load_benchmark("aime25", **kwargs)


def test_hub_is_the_default_source(monkeypatch):
    """Without TAPO_EVAL_DATA_DIR the tasks load the hub dataset named in their YAML and
    map its fields to id/problem/answer (the hub call itself is faked: no network)."""
    import datasets
    import yaml

    from eval.tasks.utils import load_benchmark

    monkeypatch.delenv("TAPO_EVAL_DATA_DIR", raising=False)
    asked = []

    def fake_load_dataset(path, split):
        asked.append((path, split))
        return datasets.Dataset.from_list(
            [{"ID": "2024-I-1", "Problem": "What is 2+2?", "Answer": 4, "Solution": "..."}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = yaml.safe_load((TASKS_DIR / "aime24.yaml").read_text())["dataset_kwargs"]
    rows = list(load_benchmark(**cfg, pretrained="ignored")["test"])
    assert asked == [("Maxwell-Jia/AIME_2024", "train")]
    assert rows == [{"id": "2024-I-1", "problem": "What is 2+2?", "answer": "4"}]
    hubs = {t: yaml.safe_load((TASKS_DIR / f"{t}.yaml").read_text())["dataset_kwargs"] for t in BENCHMARKS}
    assert (hubs["aime25"]["hub_path"], hubs["aime25"]["hub_problem_field"]) == ("math-ai/aime25", "problem")
    assert (hubs["hmmt25"]["hub_path"], hubs["hmmt25"]["hub_answer_field"]) == ("MathArena/hmmt_feb_2025", "answer")


def test_scripted_model_every_sample_scored(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("TAPO_EVAL_DATA_DIR", str(write_data(tmp_path / "data")))
    ScriptedLM.calls = []
    out = lm_eval.simple_evaluate(
        model=ScriptedLM(),
        tasks=["tapo_math"],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        apply_chat_template=True,
        bootstrap_iters=0,
        log_samples=True,
    )
    n_problems = sum(len(p) for p in SCRIPT.values())
    assert len(ScriptedLM.calls) == 5 * n_problems
    context, gen = ScriptedLM.calls[0]
    assert context.startswith("<user>") and "\\boxed{}" in context
    assert (gen["temperature"], gen["top_p"], gen["max_gen_toks"]) == (0.6, 0.9, 32768)

    group = {}
    for task in BENCHMARKS:
        expected = expected_task_metrics(task, 5)
        got = out["results"][task]
        for metric, value in expected.items():
            assert got[f"{metric},all_samples"] == pytest.approx(value), (task, metric)
            group.setdefault(metric, []).append(value)
        # every one of the 5 samples reached scoring
        for sample in out["samples"][task]:
            assert len(sample["filtered_resps"][0]) == 5
    for metric, values in group.items():
        assert out["results"]["tapo_math"][f"{metric},all_samples"] == pytest.approx(sum(values) / 3)

    # the hand-made cases do what their comments say
    assert expected_task_metrics("aime24", 5)["maj@n"] == pytest.approx((1 + 0 + 0) / 3)
    assert expected_task_metrics("aime25", 5)["maj@n"] == pytest.approx((0.5 + 1) / 2)


def test_runner_writes_table_json_and_plot(tmp_path, capsys):
    from eval.run import main

    out_dir = tmp_path / "report"
    report = main(
        [
            "--model", "tapo_scripted",
            "--model_args", "",
            "--tasks", "tapo_math",  # a group stands for its three tasks
            "--data_dir", str(write_data(tmp_path / "data")),
            "--n", "7",
            "--runs", "2",
            "--max_gen_toks", "1234",
            "--output_dir", str(out_dir),
        ]
    )  # fmt: skip
    for task in BENCHMARKS:
        expected = expected_task_metrics(task, 7)
        for metric, value in expected.items():
            assert report["summary"][task][metric]["mean"] == pytest.approx(value), (task, metric)
            assert report["summary"][task][metric]["std"] == pytest.approx(0.0)
    assert set(report["summary"]) == set(BENCHMARKS) | {"mean"}
    assert report["protocol"]["max_gen_toks"] == 1234 and report["protocol"]["seeds"] == [0, 1]

    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["summary"]["hmmt25"]["pass@5"]["mean"] == pytest.approx(
        expected_task_metrics("hmmt25", 7)["pass@5"]
    )
    table = (out_dir / "results.md").read_text()
    assert "max generation length 1234 tokens" in table
    assert "| Benchmark | Pass@1 | Pass@2 | Pass@3 | Pass@4 | Pass@5 |" in table
    pass1 = 100 * expected_task_metrics("aime24", 7)["pass@1"]
    assert f"| aime24 | {pass1:.2f} ± 0.00 |" in table
    assert "| **mean** |" in table
    assert table in capsys.readouterr().out
    assert (out_dir / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lm_eval_cli_with_tiny_hf_model(tmp_path):
    """The one real run: `lm_eval --model hf` on a tiny random model, offline, from a
    working directory outside the repository."""
    model_dir = build_tiny_model(tmp_path / "tiny")
    data_dir = write_data(tmp_path / "data")
    env = subprocess_env(
        TAPO_EVAL_DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    cmd = [
        sys.executable, "-m", "lm_eval",
        "--model", "hf",
        "--model_args", f"pretrained={model_dir}",
        "--tasks", "aime24,aime25,hmmt25",
        "--include_path", str(TASKS_DIR),
        "--limit", "1",
        "--apply_chat_template",
        "--gen_kwargs", "max_gen_toks=4",
        "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overrides existing task" in proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "|all_samples|" in line]
    task_of_row, current = [], None
    for line in rows:
        name = line.split("|")[1].strip()
        current = name or current
        task_of_row.append((current, line.split("|")[5].strip()))
    for task in BENCHMARKS:
        metrics = {m for t, m in task_of_row if t == task}
        assert {f"pass@{k}" for k in PASS_KS} | {"avg@n", "maj@n", "no_box"} <= metrics, task


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.test_eval OUT_DIR  (builds the tiny test model)")
    print(build_tiny_model(sys.argv[1]))
