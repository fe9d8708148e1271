"""Tests of tapo_ds.trajectory with a scripted policy (fixed strings), no engine, no tokenizer."""

from __future__ import annotations

import math
import random
import re
from types import SimpleNamespace

import pytest
import torch

from tapo_ds.algorithms import token_logprobs_and_entropy
from tapo_ds.metrics import StepMetrics
from tapo_ds.trajectory import (
    DEFAULT_CONSTRUCTION_TEMPLATE,
    FULL_RECONSTRUCTION_TEMPLATE,
    OTS,
    REFLECTION_MARKERS,
    ConstructionStats,
    Pair,
    assemble,
    build_requests,
    find_reflection,
    incremental_token_texts,
    load_template,
    ots_weights,
    parse_construction,
    parse_outputs,
    prefix_fidelity,
    prefix_push,
    reflects,
    render_construction_prompt,
    select_pairs,
    splice_prefix,
    split_at_reflection,
)

# --------------------------------------------------------------------------- scripted data

QUESTION = r"Solve $2x + 5 = 13$ for $x$. Put the final answer in \boxed{}."
WRONG = ("Subtract 5 from both sides: $2x = 8$.\n"
         "Divide both sides by 2: $x = 3$.\n"
         "So the answer is $\\boxed{3}$.")
RIGHT = "Subtract 5: $2x = 8$.\nDivide by 2: $x = 4$.\nFinal Answer: \\boxed{4}"
PREFIX = "Subtract 5 from both sides: $2x = 8$.\nDivide both sides by 2: $x = 3$.\n"
POST_OK = "Wait, let me double-check... 8 divided by 2 is 4, not 3.\nSo $x = 4$.\nFinal Answer: \\boxed{4}"
POST_BAD = "Wait, let me double-check... 8 divided by 2 is 5.\nSo $x = 5$.\nFinal Answer: \\boxed{5}"


def construction_output(reconstruction: str) -> str:
    return ("Sure, here is my audit.\n<analysis>\nThe first critical mistake is in step 2 "
            "(arithmetic error): 8 / 2 is 4, not 3.\n</analysis>\n<reconstruction>\n"
            f"{reconstruction}\n</reconstruction>\nThat is all.")


def stats_metrics(stats: ConstructionStats) -> dict[str, float]:
    m = StepMetrics()
    stats.add_to(m)
    return m.reduce()


def grade(text: str, answer: str) -> float:
    """A scripted verifier: the last \\boxed{...} against the reference."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return 1.0 if found and found[-1].strip() == answer else 0.0


def char_encode(text: str) -> list[int]:
    return [ord(c) for c in text]


# A toy tokenizer for y⁻: multi-character chunks (so that snapping to a token boundary
# matters), ids in their own range; the remainder is encoded char by char.
CHUNK_BASE = 10 ** 6
_chunk_vocab: dict[str, int] = {}


def chunk_tokenize(text: str) -> tuple[list[int], list[str]]:
    pieces = re.findall(r"\s*\S+|\s+$", text)
    assert "".join(pieces) == text
    ids = [CHUNK_BASE + _chunk_vocab.setdefault(p, len(_chunk_vocab)) for p in pieces]
    return ids, pieces


def toy_decode(ids: list[int]) -> str:
    inv = {v: k for k, v in _chunk_vocab.items()}
    return "".join(inv[i - CHUNK_BASE] if i >= CHUNK_BASE else chr(i) for i in ids)


# --------------------------------------------------------------------------- selection

def groups_of(counts: list[tuple[int, int]]) -> tuple[list[float], list[int]]:
    """(right, wrong) per group -> flat rewards / group ids, rights first in each group."""
    rewards, gids = [], []
    for g, (n_right, n_wrong) in enumerate(counts):
        rewards += [1.0] * n_right + [0.0] * n_wrong
        gids += [g] * (n_right + n_wrong)
    return rewards, gids


# group: 0: 2/6, 1: 1/7, 2: 5/3, 3: 4/4, 4: 0/8, 5: 8/0, 6: 3/5
COUNTS = [(2, 6), (1, 7), (5, 3), (4, 4), (0, 8), (8, 0), (3, 5)]


def test_selection_boundaries_default_setting():
    rewards, gids = groups_of(COUNTS)
    res = select_pairs(rewards, gids, n_pos=2, n_neg=4, m_max=4, rng=random.Random(0))
    # 2 right / 6 wrong selected; 1 right not; 3 wrong not (n_neg=4); 4/4 exactly at both bounds
    assert res.candidate_groups == [0, 3, 6]
    assert res.n_groups == 7 and res.n_candidates == 3 and len(res.pairs) == 12


@pytest.mark.parametrize("setting,candidates,n_pairs", [
    ((2, 2, 2), [0, 2, 3, 6], 8),
    ((2, 2, 4), [0, 2, 3, 6], 4 + 3 + 4 + 4),
    ((2, 4, 4), [0, 3, 6], 12),
    ((1, 5, 3), [0, 1, 6], 9),
])
def test_selection_dcs_settings(setting, candidates, n_pairs):
    n_pos, n_neg, m_max = setting
    rewards, gids = groups_of(COUNTS)
    res = select_pairs(rewards, gids, n_pos=n_pos, n_neg=n_neg, m_max=m_max, rng=random.Random(1))
    assert res.candidate_groups == candidates
    assert len(res.pairs) == n_pairs
    for g in candidates:
        n_wrong = COUNTS[g][1]
        assert sum(p.group == g for p in res.pairs) == min(m_max, n_wrong)  # the m_max cap


def test_selection_pairs_within_group_interleaved_and_without_replacement():
    rng = random.Random(3)
    n_groups, k = 6, 8
    # samples of a group scattered over the flat batch
    gids = [i % n_groups for i in range(n_groups * k)]
    rewards = [float(rng.random() < 0.5) for _ in gids]
    res = select_pairs(rewards, gids, n_pos=1, n_neg=1, m_max=3, rng=random.Random(7))
    assert res.pairs
    for p in res.pairs:
        assert gids[p.neg] == p.group and gids[p.pos] == p.group
        assert rewards[p.neg] == 0.0 and rewards[p.pos] == 1.0
    for g in res.candidate_groups:
        negs = [p.neg for p in res.pairs if p.group == g]
        assert len(negs) == len(set(negs))


def test_selection_deterministic_given_seed_and_random_across_seeds():
    rewards, gids = groups_of(COUNTS)
    kw = dict(n_pos=2, n_neg=2, m_max=2)
    a = select_pairs(rewards, gids, rng=random.Random(42), **kw)
    b = select_pairs(rewards, gids, rng=random.Random(42), **kw)
    assert a.pairs == b.pairs
    seen_negs, repeated_pos = set(), False
    for seed in range(200):
        res = select_pairs(rewards, gids, rng=random.Random(seed), **kw)
        seen_negs |= {p.neg for p in res.pairs if p.group == 0}
        pos3 = [p.pos for p in res.pairs if p.group == 3]
        repeated_pos |= len(pos3) != len(set(pos3))
    assert seen_negs == set(range(2, 8))  # every wrong answer of group 0 gets drawn
    assert repeated_pos  # right siblings are drawn independently per pair (with replacement)


def test_selection_rejects_bad_arguments():
    with pytest.raises(ValueError):
        select_pairs([1.0, 0.0], [0], n_pos=1, n_neg=1, m_max=1, rng=random.Random(0))
    with pytest.raises(ValueError):
        select_pairs([1.0, 0.0], [0, 0], n_pos=0, n_neg=1, m_max=1, rng=random.Random(0))
    empty = select_pairs([], [], n_pos=2, n_neg=4, m_max=4, rng=random.Random(0))
    assert empty.pairs == [] and empty.n_groups == empty.n_candidates == 0


# --------------------------------------------------------------------------- prompt

def test_builtin_templates_have_goals_and_format():
    for tpl in (DEFAULT_CONSTRUCTION_TEMPLATE, FULL_RECONSTRUCTION_TEMPLATE):
        for piece in ("math reasoning auditor", "<analysis>", "</analysis>", "<reconstruction>",
                      "</reconstruction>", "Final Answer: \\boxed{...}", "{question}", "{wrong}",
                      "{right}", "first critical mistake", "writing style"):
            assert piece in tpl, piece
    assert "Wait, let me double-check" in DEFAULT_CONSTRUCTION_TEMPLATE
    assert load_template("micro") is DEFAULT_CONSTRUCTION_TEMPLATE
    assert load_template("full") is FULL_RECONSTRUCTION_TEMPLATE


def test_render_keeps_braces_and_substitutes_once():
    question = r"Let $S = \{x \mid x^2 < 4\}$. Find $\frac{1}{2}|S|$ and put it in \boxed{}. {0}"
    wrong = r"By {right} I mean... $\boxed{\frac{3}{2}}$ {question}"
    right = r"$\boxed{2}$ with {}{{}}"
    out = render_construction_prompt(question, wrong, right)
    assert question in out and wrong in out and right in out
    # the placeholders of the template are gone, the literal ones inside inputs stay
    assert out.count("{right}") == 1 and out.count("{question}") == 1 and "{wrong}" not in out
    assert out.index(question) < out.index(wrong) < out.index(right)
    assert "Final Answer: \\boxed{...}" in out  # the template's own braces survive
    full = render_construction_prompt(question, wrong, right, template=load_template("full"))
    assert wrong in full and "Wait, let me double-check" not in full


def test_template_file_roundtrip_and_missing_placeholder(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("Q: {question}\nBad: {wrong}\nGood: {right}\n\\boxed{x}", encoding="utf-8")
    tpl = load_template(str(good))
    assert render_construction_prompt("q{1}", "w", "r", tpl) == "Q: q{1}\nBad: w\nGood: r\n\\boxed{x}"
    bad = tmp_path / "bad.txt"
    bad.write_text("Q: {question}\nBad: {wrong}\n\\boxed{...}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\{right\}"):
        load_template(str(bad))
    with pytest.raises(FileNotFoundError):
        load_template(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match=r"\{question\}"):
        render_construction_prompt("q", "w", "r", template="{wrong} {right}")


# --------------------------------------------------------------------------- parsing

def test_parse_well_formed_with_extra_text():
    p = parse_construction(construction_output(PREFIX + POST_OK))
    assert p is not None and p.closed
    assert p.analysis.startswith("The first critical mistake") and p.analysis.endswith("not 3.")
    assert p.reconstruction == (PREFIX + POST_OK).strip()


def test_parse_missing_closing_tags():
    p = parse_construction("<analysis>step 2 is wrong<reconstruction>\nA\nB \\boxed{4}<|im_end|>")
    assert p is not None and not p.closed
    assert p.analysis == "step 2 is wrong"
    assert p.reconstruction == "A\nB \\boxed{4}"
    p = parse_construction("<RECONSTRUCTION> x = 4 </s>  ")
    assert p is not None and p.analysis == "" and p.reconstruction == "x = 4"


def test_parse_several_blocks_takes_first_analysis_last_complete_reconstruction():
    text = ("<analysis>first</analysis><reconstruction>draft</reconstruction>\n"
            "<analysis>second</analysis>< reconstruction >final</ reconstruction >\n"
            "<reconstruction>cut off")
    p = parse_construction(text)
    assert p is not None and p.closed
    assert p.analysis == "first" and p.reconstruction == "final"


@pytest.mark.parametrize("text", [
    "", "The answer is \\boxed{4}.", "<analysis>only analysis</analysis>",
    "<analysis>a</analysis><reconstruction>   </reconstruction>", "<reconstruction><|im_end|>",
])
def test_parse_unparsable_is_none(text):
    assert parse_construction(text) is None


# --------------------------------------------------------------------------- fidelity

def test_split_at_reflection():
    assert "Wait, let me double-check" in REFLECTION_MARKERS
    assert split_at_reflection(PREFIX + POST_OK) == (PREFIX, POST_OK)
    assert split_at_reflection("no reflection here") == ("", "no reflection here")
    # y⁻'s own "Wait," copied inside the prefix is not the reflection point
    wrong = "Wait, is x positive? Yes.\nThen y = 2.\nSo y = 2."
    rec = "Wait, is x positive? Yes.\nThen y = 2.\nWait, let me double-check: y = 3."
    assert split_at_reflection(rec)[0] == ""
    assert split_at_reflection(rec, wrong=wrong)[0] == "Wait, is x positive? Yes.\nThen y = 2.\n"
    assert split_at_reflection("a Hmm, wait b", markers=("Hmm, wait",)) == ("a ", "Hmm, wait b")


def test_prefix_fidelity_hand_made():
    assert prefix_fidelity(PREFIX + POST_OK, WRONG) == 1.0
    assert prefix_fidelity("abcXYZ\nWait, fix it", "abcdef") == pytest.approx(3 / 6)
    assert prefix_fidelity("no marker at all", WRONG) == 0.0
    # the reflection opens the reconstruction (mistake in the very first step): nothing re-typed, nothing drifted
    assert prefix_fidelity("Wait, from the start", WRONG) == 1.0
    drift = PREFIX.replace("both sides: $2x", "each side: $2x") + POST_OK
    core = PREFIX.replace("both sides: $2x", "each side: $2x").strip()
    assert prefix_fidelity(drift, WRONG) == pytest.approx(len("Subtract 5 from ") / len(core))
    # leading whitespace of y⁻ (a rollout response often starts with one) is ignored
    assert prefix_fidelity(PREFIX + POST_OK, "\n " + WRONG) == 1.0



# y⁻ already writes its own checks (a policy trained on micro-reflective data does)
OWN_CHECK_WRONG = ("Step 1: 4+3=7\nStep 2: 7-3=4\nWait, let me double-check step 2: 7-3=4.\n"
                   "Step 3: 4-3=1\nStep 4: 1+7=7\nFinal Answer: \\boxed{7}")


def test_reflection_that_starts_like_a_copied_check_is_the_reflection():
    # the inserted check reads like y⁻'s own up to the step number: its line departs from y⁻
    rec = ("Step 1: 4+3=7\nStep 2: 7-3=4\nWait, let me double-check step 3: 4-3=1.\n"
           "Step 4: 1+7=8\nFinal Answer: \\boxed{8}")
    pre, post = split_at_reflection(rec, wrong=OWN_CHECK_WRONG)
    assert pre == "Step 1: 4+3=7\nStep 2: 7-3=4\n" and post.startswith("Wait, let me double-check step 3")
    assert prefix_fidelity(rec, OWN_CHECK_WRONG) == 1.0


def test_copied_check_line_is_skipped_and_the_later_reflection_found():
    # the rule constructor's output: y⁻ verbatim (its own check included) through the wrong step 4
    rec = OWN_CHECK_WRONG.split("\nFinal")[0] + ("\nWait, let me double-check step 4: 1+7=8.\n"
                                                  "Final Answer: \\boxed{8}")
    pre, _ = split_at_reflection(rec, wrong=OWN_CHECK_WRONG)
    assert pre == OWN_CHECK_WRONG.split("Final")[0]
    assert prefix_fidelity(rec, OWN_CHECK_WRONG) == 1.0
    # the same when y⁻ ends right after the copied check (nothing after it to tell them apart)
    assert find_reflection("a\nWait, ok.", wrong="a\nWait, ok.") is None
    assert find_reflection("a\nWait, ok.\nWait, no.", wrong="a\nWait, ok.\n") == len("a\nWait, ok.\n")


def test_reflects_on_any_marker():
    assert reflects(PREFIX + POST_OK) and reflects("x\nHmm, wait") and not reflects(WRONG)
    assert not reflects("Waiting is over.")


def test_prefix_fidelity_empty_prefix_and_no_marker():
    # the mistake is in the very first step and the reconstruction opens with the reflection
    assert prefix_fidelity("Wait, let me double-check step 1: 4+3=7.\nFinal Answer: \\boxed{7}", WRONG) == 1.0
    assert prefix_fidelity("  \nWait, at once", WRONG) == 1.0  # whitespace alone re-types nothing
    assert prefix_fidelity("Step 1: 4+3=7\nFinal Answer: \\boxed{7}", WRONG) == 0.0  # no reflection point

# --------------------------------------------------------------------------- splice

def test_splice_exact_copy_keeps_wrong_tokens_byte_for_byte():
    ids, texts = chunk_tokenize(WRONG)
    rec = PREFIX + POST_OK
    res = splice_prefix(rec, ids, texts, char_encode)
    # every chunk of y⁻ that ends inside the prefix is kept verbatim
    n_expected = sum(1 for e in _ends(texts) if e <= len(PREFIX))
    assert res.n_kept == n_expected > 0
    assert res.response_ids[:res.n_kept] == ids[:res.n_kept]
    kept_text = "".join(texts[:res.n_kept])
    assert WRONG.encode()[:len(kept_text.encode())] == kept_text.encode()
    assert toy_decode(res.response_ids) == rec == res.text
    assert res.matched_frac == 1.0


def _ends(texts):
    out, total = [], 0
    for t in texts:
        total += len(t)
        out.append(total)
    return out


def test_splice_replaces_drifted_prefix_by_wrong_tokens():
    ids, texts = chunk_tokenize(WRONG)
    drifted = "Subtract 5 from each side: $2x = 8$.\nDivide both sides by 2: $x = 3$.\n"
    res = splice_prefix(drifted + POST_OK, ids, texts, char_encode)
    m = WRONG.index("So the answer")
    assert res.text == WRONG[:m] + POST_OK
    assert toy_decode(res.response_ids) == res.text
    # the kept tokens are y⁻'s up to the token that starts with the newline before "So"
    assert res.n_kept == texts.index("\nSo")
    assert res.response_ids[:res.n_kept] == ids[:res.n_kept]
    assert "".join(texts[:res.n_kept]) == WRONG[:m - 1]
    assert 0.5 < res.matched_frac < 1.0


def test_splice_mistake_mid_line_and_unrelated_prefix():
    # the worked example of docs/method.md §Construction prompt: y⁻'s wrong conclusion on the same line is dropped
    wrong = "Subtract 5: 2x = 8.\nDivide by two: x = 3, so the answer is \\boxed{3}."
    ids, texts = chunk_tokenize(wrong)
    rec = "Subtract 5: 2x = 8.\nDivide by 2: x = 3\nWait, let me double-check... x = 4.\nFinal Answer: \\boxed{4}"
    res = splice_prefix(rec, ids, texts, char_encode, min_frac=0.3)
    # aligned: the first line exactly; "Divide by 2" drifted from "Divide by two" and the
    # 8-character minimum block keeps the short common tail out, so the rest is re-encoded
    assert res.text.startswith("Subtract 5: 2x = 8.\n") and res.text.endswith(rec[rec.index("\nWait"):])
    assert res.response_ids[:res.n_kept] == ids[:res.n_kept] and res.n_kept >= 4
    assert "so the answer" not in res.text
    same_line = "Subtract 5: 2x = 8.\nDivide by two: x = 3\nWait, let me double-check... x = 4."
    res = splice_prefix(same_line, ids, texts, char_encode)
    assert res.text == "Subtract 5: 2x = 8.\nDivide by two: x = 3\nWait, let me double-check... x = 4."
    assert "".join(texts[:res.n_kept]) == "Subtract 5: 2x = 8.\nDivide by two: x ="  # " 3," straddles
    # a prefix that is not a copy of y⁻ is left alone
    other = "Let me think about it differently, rearranging first.\nWait, let me double-check. 4."
    res = splice_prefix(other, ids, texts, char_encode)
    assert res.n_kept == 0 and res.response_ids == char_encode(other)


def test_splice_without_reflection_is_unchanged():
    ids, texts = chunk_tokenize(WRONG)
    rec = "A new solution.\nFinal Answer: \\boxed{4}"
    res = splice_prefix(rec, ids, texts, char_encode)
    assert res.n_kept == 0 and res.response_ids == char_encode(rec) and res.matched_frac == 0.0


def test_incremental_token_texts_and_no_cut_inside_a_character():
    text = "x ≤ 3, so x = 3"

    def byte_decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    ids = list(text.encode("utf-8"))  # byte-level "tokenizer": '≤' is three tokens
    texts = incremental_token_texts(ids, byte_decode)
    assert "".join(texts) == text
    assert texts[2:5] == ["", "", "≤"]
    # the matched point falls right before '≤': the partial-character tokens are not kept
    rec = "x Wait, let me double-check: x ≤ 4."
    res = splice_prefix(rec, ids, texts, lambda s: list(s.encode("utf-8")))
    assert res.n_kept == 2 and res.response_ids[:2] == ids[:2]
    assert byte_decode(res.response_ids) == rec


# --------------------------------------------------------------------------- assembly

def _rollout():
    """One question (group 5), flat batch of 8: samples 0-1 right, 2-7 wrong."""
    texts = {i: (RIGHT if i < 2 else WRONG) for i in range(8)}
    texts[7] = WRONG + " " + "x" * 400  # a long wrong answer: over the construction budget
    questions = {5: QUESTION}
    prompt_ids = {5: [101, 102, 103]}  # as rendered for the rollout (stand-in ids)
    return texts, questions, prompt_ids


def _run(keep_failed=True, prefix="regenerate", construction="micro"):
    texts, questions, prompt_ids = _rollout()
    pairs = [Pair(5, 2, 0), Pair(5, 3, 1), Pair(5, 4, 0), Pair(5, 7, 1)]
    budget = len(render_construction_prompt(QUESTION, WRONG, RIGHT)) + 50
    reqs = build_requests(pairs, questions, texts, budget_tokens=budget, count_tokens=len)
    assert reqs.pairs == pairs[:3] and reqs.skipped == [Pair(5, 7, 1)]
    outputs = [construction_output(PREFIX + POST_OK),   # right construction
               construction_output(PREFIX + POST_BAD),  # wrong construction
               "I could not follow the format, the answer is \\boxed{4}."]  # unparsable
    parsed = parse_outputs(reqs, outputs)
    r_ref = [grade(c.reconstruction, "4") for c in parsed.items]
    wrong_ids = {i: chunk_tokenize(t)[0] for i, t in texts.items()}
    sel = select_pairs([1, 1, 0, 0, 0, 0, 0, 0], [5] * 8, n_pos=2, n_neg=4, m_max=4,
                       rng=random.Random(0))
    res = assemble(parsed, r_ref, prompt_ids=prompt_ids, texts=texts, encode=char_encode,
                   eos_id=0, construction=construction, prefix=prefix, keep_failed=keep_failed,
                   response_ids=wrong_ids, decode=toy_decode, selection=sel, requests=reqs)
    return parsed, r_ref, res


def test_assembly_keeps_wrong_construction_as_negative():
    parsed, r_ref, res = _run()
    assert parsed.n_parsed == 2 and parsed.unparsable == [Pair(5, 4, 0)]
    assert r_ref == [1.0, 0.0]
    good, bad = res.samples
    assert [s.reward for s in res.samples] == [1.0, 0.0]
    for s, post in ((good, POST_OK), (bad, POST_BAD)):
        assert s.group == 5 and s.prompt_ids == [101, 102, 103]
        assert s.response_ids == char_encode(PREFIX + post) + [0]  # reconstruction + EOS
        assert s.reconstruction == PREFIX + post and "<analysis>" not in s.reconstruction
        assert s.analysis.startswith("The first critical mistake")
        assert s.prefix_fidelity == 1.0 and s.spliced_tokens == 0
        assert s.prefix_tokens == len(PREFIX)  # one token per character: y⁻'s re-typed part, up to "Wait"
    m = stats_metrics(res.stats)
    assert m == pytest.approx({
        "tapo/selected_frac": 1.0, "tapo/pairs": 4.0, "tapo/skipped_long": 1.0,
        "tapo/parse_success": 2 / 3, "tapo/construction_acc": 0.5, "tapo/prefix_fidelity": 1.0,
        "tapo/constructed_samples": 2.0,
        "tapo/constructed_tokens": float(len(PREFIX + POST_OK) + len(PREFIX + POST_BAD) + 2),
        "tapo/dropped_failed": 0.0,
    })


def test_assembly_drops_failed_under_keep_failed_false():
    _, _, res = _run(keep_failed=False)
    assert [s.reward for s in res.samples] == [1.0]
    m = stats_metrics(res.stats)
    assert m["tapo/dropped_failed"] == 1.0 and m["tapo/constructed_samples"] == 1.0
    assert m["tapo/construction_acc"] == 0.5  # accuracy is over all graded constructions


def test_assembly_splice_and_full():
    _, _, res = _run(prefix="splice")
    ids, texts = chunk_tokenize(WRONG)
    for s in res.samples:
        assert s.spliced_tokens > 0
        assert s.response_ids[:s.spliced_tokens] == ids[:s.spliced_tokens]
        assert s.response_ids[-1] == 0
        assert toy_decode(s.response_ids[:-1]) == s.reconstruction
        # every token wholly before the reflection: the spliced y⁻ tokens and what the splice re-encoded of it
        assert s.prefix_tokens >= s.spliced_tokens
        assert toy_decode(s.response_ids[:s.prefix_tokens]) == PREFIX
    _, _, full = _run(prefix="splice", construction="full")  # splice applies to micro only
    for s in full.samples:
        assert s.spliced_tokens == 0 and s.response_ids == char_encode(s.reconstruction) + [0]
        assert s.prefix_tokens == 0  # a full reconstruction re-types nothing of y⁻


def test_assembly_argument_checks_and_stats_add():
    parsed, r_ref, _ = _run()
    texts, _, prompt_ids = _rollout()
    with pytest.raises(ValueError):
        assemble(parsed, r_ref[:1], prompt_ids=prompt_ids, texts=texts, encode=char_encode, eos_id=0)
    with pytest.raises(ValueError):
        assemble(parsed, r_ref, prompt_ids=prompt_ids, texts=texts, encode=char_encode, eos_id=0,
                 prefix="splice")
    with pytest.raises(ValueError):
        build_requests([], {}, {}, budget_tokens=10)
    total = StepMetrics()  # two ranks' stats
    ConstructionStats(n_requests=2, n_parsed=1).add_to(total)
    ConstructionStats(n_requests=2, n_parsed=2).add_to(total)
    assert total.reduce()["tapo/parse_success"] == 0.75
    assert "tapo/construction_acc" not in stats_metrics(ConstructionStats())


# --------------------------------------------------------------------------- OTS

class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _logp_entropy(logits, ids):
    """What the trainer computes in the pre-update pass: log p of the next token, entropy."""
    return token_logprobs_and_entropy(logits[:, :-1], ids[:, 1:], with_entropy=True)


def _reference(logits, ids, w_min, w_max):
    z = logits[:, :-1].double()
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return torch.exp(logp + ent).clamp(w_min, w_max)


def test_ots_weights_match_formula_on_tiny_model():
    torch.manual_seed(0)
    model = TinyLM(vocab=50, dim=16)
    ids = torch.randint(0, 50, (3, 12))
    logits = model(ids)
    assert logits.requires_grad
    logp, ent = _logp_entropy(logits, ids)
    mask = torch.ones_like(logp)
    mask[1, 7:] = 0
    w = ots_weights(logp, ent, mask)
    assert not w.requires_grad  # a constant weight
    ref = _reference(logits.detach(), ids, 0.01, 10.0)
    torch.testing.assert_close(w.double(), ref * mask.double(), rtol=1e-5, atol=1e-6)
    assert (w[1, 7:] == 0).all()
    assert ((w[mask.bool()] > 0.01) & (w[mask.bool()] < 10.0)).all()  # unclamped here


def test_ots_weights_clamped_at_both_ends():
    vocab = 256
    model = TinyLM(vocab=vocab, dim=2)
    with torch.no_grad():
        # input token 0 -> half the mass on token 1, the rest uniform: high entropy and a
        # likely target, s = log p + H ~ 2.8 > log 10;
        # input token 2 -> all but certain token 3: zero entropy, any other target has
        # s ~ -30 < log 0.01.
        hi = torch.zeros(vocab)
        hi[1] = math.log(vocab - 1)
        lo = torch.zeros(vocab)
        lo[3] = 30.0
        model.emb.weight.zero_()
        model.emb.weight[0] = torch.tensor([1.0, 0.0])
        model.emb.weight[2] = torch.tensor([0.0, 1.0])
        model.head.weight.copy_(torch.stack([hi, lo], dim=1) / math.tanh(1.0))
        model.head.bias.zero_()
    ids = torch.tensor([[0, 1, 2, 5, 2, 3]])  # targets: 1 | (from 1) 2 | 5 | (from 5) 2 | 3
    logits = model(ids)
    logp, ent = _logp_entropy(logits, ids)
    mask = torch.ones_like(logp)
    w = ots_weights(logp, ent, mask, w_min=0.01, w_max=10.0)
    raw = _reference(logits.detach(), ids, 0.0, float("inf"))
    assert raw[0, 0] > 10.0 and w[0, 0] == 10.0      # clamped from above
    assert raw[0, 2] < 0.01 and w[0, 2] == pytest.approx(0.01)  # clamped from below
    assert w[0, 4] == pytest.approx(1.0, abs=1e-6)   # certain and right: exp(0 + 0)
    torch.testing.assert_close(w.double(), raw.clamp(0.01, 10.0), rtol=1e-5, atol=1e-7)


def test_ots_weights_ones_for_originals_and_the_mean_over_constructed_tokens():
    torch.manual_seed(1)
    logp = -torch.rand(4, 6) * 3
    ent = torch.rand(4, 6) * 2
    mask = torch.ones(4, 6)
    mask[2, 4:] = 0
    constructed = [False, True, True, False]
    samples = [SimpleNamespace(constructed=c, response_ids=[0] * int(m.sum())) for c, m in zip(constructed, mask)]
    rows = [logp[i][mask[i].bool()] for i in range(4)]
    ents = [ent[i][mask[i].bool()] for i in range(4)]
    out = OTS(w_min=0.01, w_max=10.0)(samples, rows, ents)
    w = out.weights
    assert (w[0] == 1).all() and (w[3] == 1).all() and len(w[3]) == 6
    full = ots_weights(logp, ent, mask)
    torch.testing.assert_close(w[1], full[1])
    torch.testing.assert_close(w[2], full[2, :4])
    assert out.tokens == 10
    assert out.total == pytest.approx(float(w[1].sum() + w[2].sum()), rel=1e-6)
    m = StepMetrics()
    out.add_to(m)
    assert m.reduce()["tapo/ots_weight_mean"] == pytest.approx(out.total / out.tokens)
    originals = [SimpleNamespace(constructed=False, response_ids=[0] * 6) for _ in range(4)]
    none = OTS()(originals, [None] * 4, [None] * 4)
    assert none.weights is None  # nothing to weigh: the update runs unweighted
    m = StepMetrics()
    none.add_to(m)
    assert m.reduce() == {}


def test_ots_split_at_the_reflection_and_the_push_on_the_copied_prefix():
    torch.manual_seed(2)
    logp, ent = -torch.rand(3, 5) * 3, torch.rand(3, 5) * 2
    samples = [SimpleNamespace(constructed=False, response_ids=[0] * 5, prefix_tokens=0, loss_start=0, advantage=-1.0),
               SimpleNamespace(constructed=True, response_ids=[0] * 5, prefix_tokens=2, loss_start=0, advantage=1.5),
               SimpleNamespace(constructed=True, response_ids=[0] * 5, prefix_tokens=3, loss_start=0, advantage=-0.5)]
    out = OTS()(samples, list(logp), list(ent))
    w = out.weights
    assert out.prefix_tokens == 5 and out.prefix_total == pytest.approx(float(w[1][:2].sum() + w[2][:3].sum()))
    m = StepMetrics()
    out.add_to(m)
    r = m.reduce()
    assert r["tapo/ots_weight_prefix_mean"] == pytest.approx(out.prefix_total / 5)
    assert r["tapo/ots_weight_after_mean"] == pytest.approx((out.total - out.prefix_total) / 5)
    total, tokens = prefix_push(samples, w)
    assert tokens == 5  # originals never count
    assert total == pytest.approx(1.5 * float(w[1][:2].sum()) - 0.5 * float(w[2][:3].sum()))
    assert prefix_push(samples, None) == (pytest.approx(1.5 * 2 - 0.5 * 3), 5)  # w = 1 without OTS
    # tapo.prefix_loss: mask: the copied tokens are out of the loss, so nothing of them is weighed or pushed
    for s in samples[1:]:
        s.loss_start = s.prefix_tokens
    assert prefix_push(samples, None) == (0.0, 0)
    masked = OTS()(samples, [logp[0], logp[1][2:], logp[2][3:]], [ent[0], ent[1][2:], ent[2][3:]])
    assert masked.prefix_tokens == 0 and masked.tokens == 5


def test_no_deepspeed_or_transformers_import():
    """ARCHITECTURE.md: trajectory/ is pure (torch and tapo_ds.reward at most)."""
    import ast
    import pathlib

    import tapo_ds.trajectory as pkg

    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("deepspeed", "transformers"), (path.name, name)
                if name.startswith("tapo_ds"):
                    assert name in ("tapo_ds.reward", "tapo_ds.algorithms.registry"), (path.name, name)
