"""In-training evaluation: exact pass@k from a scripted policy whose per-problem correct counts we set."""

from pathlib import Path

import pytest
from deepspeed.runtime.rollout.base import SamplingConfig

from eval.metrics import pass_at_k
from tapo_ds.data import load_examples, prepare
from tapo_ds.engine import EngineInfo
from tapo_ds.evaluation import EvalSettings, Evaluator
from tapo_ds.modeling import build_tiny_tokenizer
from tapo_ds.reward import GradingPool
from tapo_ds.scripted import ScriptedRollout

REPO = Path(__file__).resolve().parent.parent


def test_pass_at_k_matches_the_estimator():
    tok = build_tiny_tokenizer()
    ex = load_examples([str(REPO / "data" / "quickstart" / "test.jsonl")], "problem", "answer", limit=5)
    probs, _ = prepare(ex, tok, "{problem}", {}, 256)
    right = {p.example.problem: (i, p.example.answer) for i, p in enumerate(probs)}

    def script(prompt, k):  # problem i: samples k < i are right (0..4 right of 5)
        for problem, (i, gold) in right.items():
            if problem in prompt:
                if k < i:  # the first right answer of each problem reflects on the way
                    return ("7\nWait, let me double-check: " if k == 0 else "") + f"\\boxed{{{gold}}}"
                return "\\boxed{1000}"
        raise AssertionError(prompt)

    info = EngineInfo(world_size=1, rank=0, local_rank=0, zero_stage=0, hybrid_engine=False, hybrid_reason="",
                      device="cpu")
    sampling = SamplingConfig(max_new_tokens=32, n_samples_per_prompt=5)
    with GradingPool(num_workers=1) as grader:
        ev = Evaluator({"toy": probs}, EvalSettings(every=1, sampling=sampling, ks=(1, 3, 5), batch_questions=2),
                       rollout=ScriptedRollout(tok, script, tok.eos_token_id, tok.pad_token_id), grader=grader,
                       tokenizer=tok, info=info)
        m = ev.run(1)
    for k in (1, 3, 5):
        assert m[f"eval/toy/pass@{k}"] == pytest.approx(sum(pass_at_k(5, c, k) for c in range(5)) / 5)
    assert m["eval/toy/avg@5"] == pytest.approx((0 + 1 + 2 + 3 + 4) / 25)
    assert m["eval/toy/reflection_rate"] == pytest.approx(4 / 25)  # problems 1-4 have a first right answer
    with pytest.raises(ValueError, match="outside 1..samples=5"):
        Evaluator({}, EvalSettings(every=1, sampling=sampling, ks=(6,), batch_questions=2), rollout=None,
                  grader=None, tokenizer=tok, info=info)
