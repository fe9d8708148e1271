"""bench/verdict_accuracy.py: its side-by-side layout, and its verdict reading checked with two stand-in
models whose predictions are known (one that always predicts the reference's next token, one that always
predicts " ok.")."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("verdict_bench", REPO / "bench" / "verdict_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(REPO / "checkpoints" / "miniature-coldstart")


def test_side_by_side(bench):
    prompt = "Find it.\nProblem: From 2: +1, *3.\nWrong:\nStep 1: 2+1=3\nFinal Answer: \\boxed{3}\n" \
             "Right:\nStep 1: 2+1=3\nStep 2: 3*3=9\nFinal Answer: \\boxed{9}"
    assert bench.side_by_side(prompt) == (
        "Find it.\nProblem: From 2: +1, *3.\nWrong | Right:\nStep 1: 2+1=3 | Step 1: 2+1=3\n"
        "Final Answer: \\boxed{3} | Step 2: 3*3=9\n- | Final Answer: \\boxed{9}")


class Oracle:
    """Logits that put all mass on the next token of the input (or on ``always``)."""

    def __init__(self, vocab, always=None):
        self.vocab, self.always = vocab, always

    def __call__(self, ids):
        n = ids.shape[1]
        logits = torch.zeros(1, n, self.vocab)
        nxt = ids[0, 1:].tolist() + [0]
        for t, tok in enumerate(nxt):
            logits[0, t, tok if self.always is None else self.always] = 10.0
        return SimpleNamespace(logits=logits)


def test_verdicts_of_known_predictors(bench, tokenizer):
    rows = bench.held_out_rows(20, seed=7)
    assert len(rows) == 20 and all(r["kind"] == "ift" for r in rows)
    perfect = bench.verdicts(Oracle(len(tokenizer)), tokenizer, rows, aligned=False)
    assert perfect["verdicts"] > 20
    assert perfect["verdicts_right"] == 1.0 and perfect["rows_all_right"] == 1.0
    assert perfect["p_wrong_at_wrong_step"] > 0.99
    ok = tokenizer.convert_tokens_to_ids(" ")
    always_ok = bench.verdicts(Oracle(len(tokenizer), always=ok), tokenizer, rows, aligned=True)
    assert always_ok["verdicts"] == perfect["verdicts"]
    assert always_ok["verdicts_right"] == pytest.approx(always_ok["always_ok_scores"])
    assert 0 < always_ok["always_ok_scores"] < 1 and always_ok["p_wrong_at_wrong_step"] < 0.5
