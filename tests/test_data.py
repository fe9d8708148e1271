"""Data: rows validated with file:line errors, prompts rendered with the chat template, sampler state."""

import json

import pytest

from tapo_ds.data import DataError, EpochSampler, load_examples, prepare, render_prompt, shard
from tapo_ds.modeling import build_tiny_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_and_validate(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", [{"problem": "1+1?", "answer": 2}, {"problem": "x", "answer": "\\frac12"}])
    ex = load_examples([str(good)], "problem", "answer")
    assert [e.answer for e in ex] == ["2", "\\frac12"] and ex[0].source.endswith("a.jsonl:1")

    bad = write_jsonl(tmp_path / "b.jsonl", [{"problem": "ok", "answer": "1"}, {"problem": "no answer"}])
    with pytest.raises(DataError, match=r"b.jsonl:2: missing or empty field 'answer'"):
        load_examples([str(bad)], "problem", "answer")
    broken = write_jsonl(tmp_path / "c.jsonl", [{"problem": "ok", "answer": "1"}, "{not json"])
    with pytest.raises(DataError, match=r"c.jsonl:2: invalid JSON"):
        load_examples([str(broken)], "problem", "answer")
    empty = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: missing or empty field 'problem'"):
        load_examples([str(empty)], "problem", "answer")
    with pytest.raises(DataError, match="file not found"):
        load_examples([str(tmp_path / "missing.jsonl")], "problem", "answer")


def test_parquet_and_custom_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"Problem": ["a", "b"], "Answer": ["1", ""]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet\[1\]: missing or empty field 'Answer'"):
        load_examples([str(tmp_path / "t.parquet")], "Problem", "Answer")
    assert len(load_examples([str(tmp_path / "t.parquet")], "Problem", "Answer", limit=1)) == 1


def test_prompt_rendering_and_budget(tmp_path):
    tok = build_tiny_tokenizer()
    text = render_prompt(tok, "What is {x}?", "{problem} Put it in \\boxed{}.", {})
    assert text == "<|im_start|>user\nWhat is {x}? Put it in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    ex = load_examples([str(write_jsonl(tmp_path / "a.jsonl", [{"problem": "short", "answer": "1"},
                                                                  {"problem": "l" * 500, "answer": "1"}]))],
                       "problem", "answer")
    kept, too_long = prepare(ex, tok, "{problem}", {}, max_prompt_tokens=100)
    assert too_long == 1 and len(kept) == 1
    assert tok.decode(kept[0].prompt_ids) == render_prompt(tok, "short", "{problem}", {})


def test_sampler_resume_and_shard():
    a = EpochSampler(10, seed=3)
    first = [a.next_indices(4) for _ in range(2)]
    state = a.state_dict()
    rest = [a.next_indices(4) for _ in range(3)]  # crosses an epoch boundary
    b = EpochSampler(10, seed=3)
    b.load_state_dict(state)
    assert [b.next_indices(4) for _ in range(3)] == rest
    assert sorted(first[0] + first[1] + rest[0][:2]) == list(range(10))
    with pytest.raises(ValueError, match="data changed"):
        EpochSampler(11, seed=3).load_state_dict(state)
    batch = list(range(8))
    assert shard(batch, 0, 2) + shard(batch, 1, 2) == batch
