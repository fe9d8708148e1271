"""Prefilter and cold-start builder on a scripted policy; the stages run from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from deepspeed.runtime.rollout.base import SamplingConfig

from tapo_ds.coldstart import build_coldstart, model_constructor, pool_grader
from tapo_ds.data import load_examples, prepare, write_jsonl
from tapo_ds.modeling import build_tiny_tokenizer
from tapo_ds.prefilter import PrefilterResult, count_correct, sample_and_grade, write_filtered
from tapo_ds.reward import GradingPool
from tapo_ds.scripted import ScriptedRollout
from tapo_ds.synthetic.constructor import construct
from tapo_ds.synthetic.errors import corrupt
from tapo_ds.synthetic.task import generate_dataset
from tapo_ds.trajectory import DEFAULT_CONSTRUCTION_TEMPLATE

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def grader():
    with GradingPool(num_workers=1) as pool:
        yield pool


@pytest.fixture
def synthetic(tmp_path):
    rows = generate_dataset(9, seed=4, steps=(2, 3))
    write_jsonl(rows, tmp_path / "train.jsonl")
    tok = build_tiny_tokenizer()
    qs, _ = prepare(load_examples([str(tmp_path / "train.jsonl")], "problem", "answer"), tok, "{problem}", {}, 256)
    return rows, qs, tok


def solver(rows):
    """Question i (by problem text) gets i % 9 right answers out of 8 (0..8, all counts once)."""
    by_problem = {r["problem"]: (i, r) for i, r in enumerate(rows)}
    constructions = [0]

    def script(prompt, k):
        if "<reconstruction>" in prompt:  # a construction request: the rule constructor, spoiled now and then
            constructions[0] += 1
            for problem, (_, row) in by_problem.items():
                if problem in prompt:
                    good = construct(problem, _first_solution(prompt))
                    if constructions[0] % 5 == 0:
                        return "garbage"  # unparsable
                    if constructions[0] % 3 == 0:  # parses, but the answer is wrong
                        return good.replace("\\boxed{", "\\boxed{1")
                    return good
            return "garbage"
        for problem, (i, row) in by_problem.items():
            if problem in prompt:
                if k < i % 9:
                    return row["solution"]
                return corrupt(row["solution"], __import__("random").Random(k), "arithmetic").text
        raise AssertionError(prompt)
    return script


def _first_solution(prompt):
    # the wrong response is the first "Step 1:" block in the construction prompt
    start = prompt.index("Step 1:")
    end = prompt.index("}", prompt.index("\\boxed{", start)) + 1
    return prompt[start:end]


def test_prefilter_keeps_exactly_the_band(synthetic, grader):
    rows, qs, tok = synthetic
    rollout = ScriptedRollout(tok, solver(rows), tok.eos_token_id, tok.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=200, n_samples_per_prompt=8)
    counts = count_correct(qs, rollout=rollout, grader=grader, tokenizer=tok, sampling=sampling, batch_questions=4,
                           device="cpu")
    assert counts == [i % 9 for i in range(9)]
    result = PrefilterResult(counts, 8)
    assert result.keep(0.125, 0.875) == [1, 2, 3, 4, 5, 6, 7]
    assert result.histogram() == [1] * 9
    assert "kept 7 of 9" in result.render(0.125, 0.875)


def test_coldstart_keeps_only_verified(synthetic, grader, tmp_path):
    rows, qs, tok = synthetic
    rollout = ScriptedRollout(tok, solver(rows), tok.eos_token_id, tok.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=200, n_samples_per_prompt=8)
    texts, rewards = sample_and_grade(qs, rollout=rollout, grader=grader, tokenizer=tok, sampling=sampling,
                                      batch_questions=4, device="cpu")
    constructor = model_constructor(rollout=rollout, tokenizer=tok, sampling=SamplingConfig(max_new_tokens=400),
                                    chat_template_kwargs={}, device="cpu")
    result = build_coldstart([q.example.problem for q in qs], [q.example.answer for q in qs], texts, rewards,
                             constructor, pool_grader(grader), n_pos=1, n_neg=1, m_max=2, seed=0,
                             prompt_template="{problem}", construction_template=DEFAULT_CONSTRUCTION_TEMPLATE)
    # questions with 1..7 right of 8 are candidates; m_max=2 pairs each, 1 for the one with a single wrong
    assert result.stats.pairs == 13 and rollout.calls == 3 + 1  # 3 sampling batches, 1 construction batch
    s = result.stats
    assert s.constructed == 13 and s.parsed == 13 - 13 // 5 and 0 < s.verified < s.parsed
    assert s.kept_sft == s.verified
    sft, ift = result.write(tmp_path)
    sft_rows = [json.loads(x) for x in sft.read_text().splitlines()]
    ift_rows = [json.loads(x) for x in ift.read_text().splitlines()]
    assert sft_rows and ift_rows
    for row in sft_rows:
        problem = row["prompt"]
        gold = next(r["answer"] for r in rows if r["problem"] == problem)
        assert row["response"].rstrip().endswith(f"\\boxed{{{gold}}}")
    assert all(r["response"].startswith("<analysis>") for r in ift_rows)


def test_prefilter_stage_cli(tmp_path):
    write_jsonl(generate_dataset(6, seed=1), tmp_path / "train.jsonl")
    cmd = [sys.executable, str(REPO / "tapo_ds" / "main.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
           "--set", "stage=prefilter", "--set", f"data.train_files=[{tmp_path / 'train.jsonl'}]",
           "--set", "data.prompt_template={problem}", "--set", "prefilter.samples=4",
           "--set", "rollout.max_new_tokens=8", "--set", f"output_dir={tmp_path}", "--set", "torch_threads=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pass-rate histogram (6 questions x 4 samples)" in proc.stdout
    assert (tmp_path / "tiny" / "filtered.jsonl").is_file()


def test_filtered_rows_keep_their_reference_solution(tmp_path):
    """OPSD's teacher reads the reference solution from the prefilter's output: it must survive."""
    src = tmp_path / "rows.jsonl"
    write_jsonl([{"q": "1+1?", "a": "2", "sol": "1+1=2"}, {"q": "2+2?", "a": "4"}], src)
    tok = build_tiny_tokenizer()
    questions, _ = prepare(load_examples([str(src)], "q", "a", solution_field="sol"), tok, "{problem}", {}, 64)
    out = tmp_path / "filtered.jsonl"
    write_filtered(out, questions, PrefilterResult([1, 1], 2), [0, 1], "q", "a", "sol")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["sol"] == "1+1=2" and "sol" not in rows[1]
    again = load_examples([str(out)], "q", "a", solution_field="sol")
    assert [e.solution for e in again] == ["1+1=2", None]
