"""The synthetic task (issue 5 part 4) and the cold-start builder's pure core (part 2)."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from tapo_ds.coldstart import build_coldstart, format_examples, per_pair, pool_grader
from tapo_ds.data import read_jsonl
from tapo_ds.reward import GradingPool, last_boxed, math_equal
from tapo_ds.synthetic import (
    ERROR_KINDS,
    PROMPT_TEMPLATE,
    SYNTHETIC_CONSTRUCTION_TEMPLATE,
    CorruptionError,
    Problem,
    build_synthetic_mix,
    construct,
    corrupt,
    diagnose,
    generate_dataset,
    generate_problems,
    mix_counts,
    parse_problem,
    parse_step,
    random_wrong_solution,
    rule_constructor,
    split_of,
    synthetic_grader,
)
from tapo_ds.synthetic.__main__ import main as cli_main
from tapo_ds.synthetic.task import apply
from tapo_ds.trajectory import (
    DEFAULT_CONSTRUCTION_TEMPLATE,
    parse_construction,
    prefix_fidelity,
    render_construction_prompt,
    validate_template,
)

EXAMPLE = Problem(7, (("+", 5), ("*", 3), ("-", 4)))


def problems(n, seed=0, **kw):
    return generate_problems(n, seed, split="train", **kw)


# --------------------------------------------------------------------------- the task


def test_format_of_a_problem_and_its_solution():
    assert EXAMPLE.text == "From 7: +5, *3, -4."
    assert EXAMPLE.solution == "Step 1: 7+5=12\nStep 2: 12*3=36\nStep 3: 36-4=32\nFinal Answer: \\boxed{32}"
    assert EXAMPLE.answer == 32
    assert parse_problem(EXAMPLE.text) == EXAMPLE
    assert parse_problem("Please solve: From 7: +5, *3, -4. Answer in \\boxed{}.") == EXAMPLE
    assert parse_problem("From 7: /2.") is None  # not exact
    assert parse_problem("no problem here") is None
    assert parse_step("Step 2: 12*3=36") is not None
    assert parse_step("Step 2: 12*3=") is None


def test_dataset_is_deterministic_from_the_seed():
    a = generate_dataset(300, seed=3, steps=(2, 4), digits=1)
    assert a == generate_dataset(300, seed=3, steps=(2, 4), digits=1)
    assert a != generate_dataset(300, seed=4, steps=(2, 4), digits=1)
    assert [r["id"] for r in a] == [f"train-{i:05d}" for i in range(300)]
    assert len({r["problem"] for r in a}) == 300  # distinct within a split
    assert set(a[0]) == {"id", "problem", "answer", "solution"}


@pytest.mark.parametrize("knobs", [
    dict(steps=(2, 4), digits=1),
    dict(steps=1, digits=2),
    dict(steps=(3, 5), digits=(1, 2), operators="+-*/"),
    dict(steps=(2, 3), digits=1, operators="*/", max_value=500),
])
def test_difficulty_knobs_and_gold_verifies(knobs):
    rows = generate_dataset(150, seed=1, **knobs)
    lo, hi = (knobs["steps"], knobs["steps"]) if isinstance(knobs["steps"], int) else knobs["steps"]
    d = knobs["digits"]
    dlo, dhi = (d, d) if isinstance(d, int) else d
    ops = knobs.get("operators", "+-*")
    bound = knobs.get("max_value", 10 ** (2 * dhi + 1) - 1)
    seen_steps = set()
    for r in rows:
        p = parse_problem(r["problem"])
        assert p is not None and p.text == r["problem"]
        seen_steps.add(len(p.ops))
        assert lo <= len(p.ops) <= hi
        assert all(op in ops and 10 ** (dlo - 1) <= b <= 10 ** dhi - 1 for op, b in p.ops)
        steps = [parse_step(line) for line in r["solution"].splitlines()[:-1]]
        value = p.start
        for i, (s, (op, b)) in enumerate(zip(steps, p.ops), 1):
            assert s.index == i and s.a == value and (s.op, s.b) == (op, b)
            assert s.result == apply(value, op, b) and 0 <= s.result <= bound
            value = s.result
        assert r["answer"] == str(value)
        assert r["solution"].endswith(f"Final Answer: \\boxed{{{value}}}")
    assert seen_steps == set(range(lo, hi + 1))
    assert all(synthetic_grader([(r["solution"], r["answer"]) for r in rows]))
    assert all(math_equal(r["solution"], r["answer"]) for r in rows[:40])


def test_train_and_test_are_disjoint_for_any_seed_and_size():
    train = generate_dataset(2000, seed=0, split="train")
    test = generate_dataset(200, seed=0, split="test")
    test_other_seed = generate_dataset(200, seed=1, split="test")
    train_problems = {r["problem"] for r in train}
    assert not train_problems & {r["problem"] for r in test}
    assert not train_problems & {r["problem"] for r in test_other_seed}
    assert all(split_of(r["problem"]) == "test" for r in test)
    assert all(split_of(r["problem"]) == "train" for r in train)
    # A larger train set extends the smaller one; the test set does not depend on it.
    assert generate_dataset(500, seed=0, split="train") == train[:500]


def test_a_space_too_small_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="too small"):
        generate_dataset(100, seed=0, steps=1, digits=1, operators="+", split="test")


# --------------------------------------------------------------------------- errors + constructor


def written_chain_is_consistent(wrong):
    """Every step after the wrong one continues correctly from the written value."""
    steps = wrong.steps
    for i, s in enumerate(steps):
        assert s.index == i + 1
        if i + 1 > wrong.step:
            assert s.a == steps[i - 1].result
            assert apply(s.a, s.op, s.b) == s.result
    assert wrong.text.splitlines()[-1] == f"Final Answer: \\boxed{{{wrong.answer}}}"
    assert [parse_step(line) for line in wrong.text.splitlines()[:-1]] == list(steps)


KNOBS = {  # name: (problem knobs, the least fraction of problems that must admit the error)
    "default": (dict(steps=(2, 4), digits=1, operators="+-*"), 0.97),
    "hard": (dict(steps=(1, 5), digits=(1, 2), operators="+-*/"), 0.7),
}


@pytest.mark.parametrize("knobs", sorted(KNOBS))
@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_every_error_kind_is_wrong_and_the_rule_constructor_fixes_it(kind, knobs):
    task, least = KNOBS[knobs]
    rng = random.Random(f"errors-{kind}")
    checked, skipped, to_grade = 0, 0, []
    for p in problems(200, seed=7, **task):
        try:
            wrong = corrupt(p, rng, kind, operators=task["operators"])
        except CorruptionError:
            # Possible only where exact division, a one-step problem or a lack of other
            # numbers leaves no error of the kind that changes the answer.
            assert any(op == "/" for op, _ in p.ops) or len(p.ops) == 1 or kind in ("copy", "operator"), p
            skipped += 1
            continue
        checked += 1
        assert wrong.kind == kind and 1 <= wrong.step <= len(p.ops)
        assert wrong.answer != p.answer and last_boxed(wrong.text) == str(wrong.answer)
        written_chain_is_consistent(wrong)
        # The wrong text verbatim up to the end of the wrong step's line.
        d = diagnose(p.text, wrong.text)
        assert d is not None and d.step == wrong.step and d.kind == kind, (p.text, wrong.text, d)
        for mode in ("micro", "full"):
            out = construct(p.text, wrong.text, p.solution, mode=mode)
            parsed = parse_construction(out)
            assert parsed is not None and parsed.closed
            assert out == f"<analysis>{parsed.analysis}</analysis><reconstruction>{parsed.reconstruction}</reconstruction>"
            assert parsed.analysis.startswith(f"Step {wrong.step} is ")
            to_grade.append((parsed.reconstruction, str(p.answer)))
            if mode == "full":
                assert parsed.reconstruction == p.solution
                continue
            assert prefix_fidelity(parsed.reconstruction, wrong.text) == 1.0
            pre, _, post = parsed.reconstruction.partition("\nWait, let me double-check")
            assert wrong.text.startswith(pre + "\n")
            assert len(pre.splitlines()) == (wrong.step - 1 if kind == "skip" and wrong.step == len(p.ops)
                                             else wrong.step)
            assert post.startswith(f" step {wrong.step}: ")
    assert checked >= least * 200, (checked, skipped)
    assert all(math_equal(r, g) for r, g in to_grade)


def test_error_at_every_step_and_the_example_of_the_issue():
    wrong = corrupt(EXAMPLE, random.Random(0), "arithmetic", at=2)
    assert wrong.text.startswith("Step 1: 7+5=12\nStep 2: 12*3=")
    for kind in ERROR_KINDS:
        for at in range(1, 4):
            if kind == "carry" and at == 1:
                with pytest.raises(CorruptionError):
                    corrupt(EXAMPLE, random.Random(0), kind, at=at)
                continue
            w = corrupt(EXAMPLE, random.Random(at), kind, at=at)
            assert w.step == at and diagnose(EXAMPLE.text, w.text).step == at
    text = "Step 1: 7+5=12\nStep 2: 12*3=35\nStep 3: 35-4=31\nFinal Answer: \\boxed{31}"
    assert construct(EXAMPLE.text, text) == (
        "<analysis>Step 2 is wrong: 12*3 is 36, not 35 (arithmetic error).</analysis>"
        "<reconstruction>Step 1: 7+5=12\nStep 2: 12*3=35\nWait, let me double-check step 2: 12*3=36.\n"
        "Step 3: 36-4=32\nFinal Answer: \\boxed{32}</reconstruction>")
    assert construct(EXAMPLE.text, text, analysis="checked").startswith(
        "<analysis>Step 1 ok. Step 2 is wrong:")
    # diff: the two results side by side up to the first that differs
    assert construct(EXAMPLE.text, text, analysis="diff").startswith(
        "<analysis>1: 12 vs 12 same. 2: 35 vs 36 differs. Step 2 is wrong:")
    missing = "Step 1: 7+5=12\nFinal Answer: \\boxed{12}"  # step 2 skipped: nothing written there
    assert construct(EXAMPLE.text, missing, analysis="diff").startswith(
        "<analysis>1: 12 vs 12 same. 2: nothing vs 36 differs. Step 2 is missing:")
    right_steps = "Step 1: 7+5=12\nStep 2: 12*3=36\nStep 3: 36-4=32\nFinal Answer: \\boxed{30}"
    assert construct(EXAMPLE.text, right_steps, analysis="diff").startswith(
        "<analysis>1: 12 vs 12 same. 2: 36 vs 36 same. 3: 32 vs 32 same. answer: differs. The final answer")
    # copied: each line re-typed before its verdict, the wrong one with its diagnosis
    assert construct(EXAMPLE.text, text, analysis="copied").startswith(
        "<analysis>Step 1: 7+5=12 ok. Step 2: 12*3=35 is wrong: 12*3 is 36, not 35 (arithmetic error).</analysis>")
    assert construct(EXAMPLE.text, missing, analysis="copied").startswith(
        "<analysis>Step 1: 7+5=12 ok. Step 2 is missing:")
    assert construct(EXAMPLE.text, right_steps, analysis="copied").startswith(
        "<analysis>Step 1: 7+5=12 ok. Step 2: 12*3=36 ok. Step 3: 36-4=32 ok. The final answer is wrong:")
    # parted: the text both answers share, "^" where they part, the diagnosis
    right = EXAMPLE.solution
    assert construct(EXAMPLE.text, text, right, analysis="parted").startswith(
        "<analysis>Step 1: 7+5=12\nStep 2: 12*3=3^\nStep 2 is wrong: 12*3 is 36, not 35 (arithmetic error).</analysis>")
    assert construct(EXAMPLE.text, text, analysis="parted") == construct(EXAMPLE.text, text, right, analysis="parted")
    assert construct(EXAMPLE.text, missing, right, analysis="parted").startswith(
        "<analysis>Step 1: 7+5=12\n^\nStep 2 is missing:")
    corrected = "Step 1: 7+5=12\nStep 2: 12+3=15\nWait, let me double-check step 2: 12*3=36.\nStep 3: 36-4=31"
    assert construct(EXAMPLE.text, corrected, analysis="copied").startswith(
        "<analysis>Step 1: 7+5=12 ok. Step 2: 12+3=15 Wait, let me double-check step 2: 12*3=36. ok. "
        "Step 3: 36-4=31 is wrong: 36-4 is 32, not 31")


def test_accidental_right_answers_are_avoided():
    # 2*2 == 2+2, skipping *1 (or the only step) changes nothing, "3" copied as "3".
    two = Problem(2, (("*", 2),))
    for seed in range(30):
        w = corrupt(two, random.Random(seed), "operator")
        assert w.steps[0].op != "+" and w.answer != 4
    with pytest.raises(CorruptionError):
        corrupt(Problem(5, (("*", 1), ("+", 2))), random.Random(0), "skip", at=1)
    with pytest.raises(CorruptionError):
        corrupt(Problem(3, (("+", 3),)), random.Random(0), "copy")  # every number is a 3
    with pytest.raises(CorruptionError):
        corrupt(Problem(3, (("+", 4),)), random.Random(0), "carry")  # needs two steps
    # Skipping the first of two equal operations would read as skipping the second.
    w = corrupt(Problem(3, (("+", 4), ("+", 4), ("*", 2))), random.Random(0), "skip", at=2)
    assert diagnose("From 3: +4, +4, *2.", w.text).step == 2
    with pytest.raises(CorruptionError):
        corrupt(Problem(3, (("+", 4), ("+", 4), ("*", 2))), random.Random(0), "skip", at=1)
    # Whatever the kinds allowed, a random wrong solution is wrong.
    rng = random.Random(1)
    for p in problems(100, seed=2, steps=(1, 4)):
        assert random_wrong_solution(p, rng).answer != p.answer


def test_corrupt_is_deterministic_from_the_rng():
    ps = problems(50, seed=5)
    a = [corrupt(p, random.Random(i), ERROR_KINDS[i % 5]).text for i, p in enumerate(ps) if len(p.ops) > 1]
    b = [corrupt(p, random.Random(i), ERROR_KINDS[i % 5]).text for i, p in enumerate(ps) if len(p.ops) > 1]
    assert a == b
    assert corrupt(EXAMPLE.solution, random.Random(0), "copy") == corrupt(EXAMPLE, random.Random(0), "copy")


def test_model_like_mistakes_are_located():
    q = EXAMPLE.text
    cases = {
        # written text -> (step, kind)
        "Step 1: 7+5=12\nStep 2: 12*3=36\nStep 3: 36-4=32\nStep 4: 32-4=28\nFinal Answer: \\boxed{28}": (4, "extra"),
        "Step 1: 7+5=12\nStep 2: 12*3=36\nStep 3: 36-4=32\nFinal Answer: \\boxed{33}": (4, "final"),
        "Step 1: 7+5=12\nStep 2: 12*3=36\nStep 3: 36-4=32": (4, "final"),
        "Step 1: 7+5=12\nStep 2: 12*3=36\nFinal Answer: \\boxed{36}": (3, "skip"),
        "Step 1: 7+5=12\nStep 2: 12*3=36\nSte": (3, "incomplete"),
        "Step 1: 7+5=12\nStep 2: 12*3=36\nblah blah\nStep 3: 36-4=32": (3, "incomplete"),
        "Step 1: 7+5=12\nStep 2: 12-7=5\nStep 3: 5-4=1\nFinal Answer: \\boxed{1}": (2, "misread"),
        "Step 1: 7+5=12\n\nStep 2: 12*3=35\r\nStep 3: 35-4=31": (2, "arithmetic"),
        "  Step 1 : 7 + 5 = 13\nStep 2: 13*3=39": (1, "arithmetic"),
        "Step 1: 5+5=10\nStep 2: 10*3=30": (1, "copy"),
    }
    for text, (step, kind) in cases.items():
        d = diagnose(q, text)
        assert (d.step, d.kind) == (step, kind), text
        out = construct(q, text)
        rec = parse_construction(out).reconstruction
        assert synthetic_grader([(rec, "32")]) == [True], out
        assert prefix_fidelity(rec, text) == 1.0, out
    # A right solution: nothing to construct.
    assert construct(q, EXAMPLE.solution) is None
    assert construct(q, EXAMPLE.solution + "\n") is None


MALFORMED = [
    "", " ", "\n\n", "asdf", "Step 1:", "Step 1: 7+", "Final Answer: \\boxed{32}",
    "Final Answer: \\boxed{5}", "The answer is 32.", "garbage\nStep 1: 7+5=12\nStep 2: 12*3=36",
    "<analysis>x</analysis>", "\\boxed{", "Step 1: " + "9" * 5000 + "+5=1", "Step x: 7+5=12",
    "Step 1: 7+5=12=12", "Step 1: 7+5=1e3", "\x00\x01\x02", "Wait, let me double-check",
]


def test_malformed_inputs_return_none_without_raising():
    for text in MALFORMED:
        assert construct(EXAMPLE.text, text) is None, text
        assert diagnose(EXAMPLE.text, text) is None
    for question in ["", "nonsense", "From x: +1.", "From 7: /2.", "From 7: .", None, 3]:
        assert construct(question, "Step 1: 7+5=13\nFinal Answer: \\boxed{13}") is None
    assert construct(EXAMPLE.text, None) is None
    with pytest.raises(ValueError):
        construct(EXAMPLE.text, "Step 1: 7+5=13", mode="bogus")


def test_every_truncation_and_random_noise_never_raises():
    rng = random.Random(0)
    alphabet = "Step 0123456789+-*/=:\n\\boxed{}Final Answer"
    for p in problems(40, seed=11, steps=(2, 4)):
        wrong = random_wrong_solution(p, rng)
        for text in [wrong.text[:i] for i in range(len(wrong.text) + 1)] + [
                "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(20)]:
            out = construct(p.text, text)
            if out is None:
                continue
            rec = parse_construction(out).reconstruction
            assert synthetic_grader([(rec, str(p.answer))]) == [True], (p.text, text, out)
            assert prefix_fidelity(rec, text) == 1.0, (p.text, text, out)


# --------------------------------------------------------------------------- the builder


def scripted_groups(n=12, k=4, seed=0):
    """n questions, K responses each: some right (gold), the others wrong (corrupted)."""
    rng = random.Random(seed)
    qs, answers, responses, rewards = [], [], [], []
    for i, p in enumerate(problems(n, seed=seed, steps=(2, 3))):
        n_right = i % (k + 1)  # 0..k right answers: some groups are not candidates
        resp = [p.solution] * n_right + [random_wrong_solution(p, rng).text for _ in range(k - n_right)]
        qs.append(p.text)
        answers.append(str(p.answer))
        responses.append(resp)
        rewards.append([1.0] * n_right + [0.0] * (k - n_right))
    return qs, answers, responses, rewards


def math_equal_grader(pairs):
    return [math_equal(response, gold) for response, gold in pairs]


def test_builder_keeps_only_verified_constructions_and_writes_both_formats(tmp_path):
    qs, answers, responses, rewards = scripted_groups()
    rule = rule_constructor()
    calls = []

    def flaky(question, wrong, right):
        i = len(calls)
        calls.append((question, wrong, right))
        good = rule(question, wrong, right)
        if i % 5 == 1:
            return None                          # failed generation
        if i % 5 == 2:
            return "I cannot do this."           # does not parse
        if i % 5 == 3:                           # parses, wrong answer
            return good.replace("Final Answer: \\boxed{", "Final Answer: \\boxed{1")
        return good

    res = build_coldstart(qs, answers, responses, rewards, per_pair(flaky), math_equal_grader,
                          n_pos=1, n_neg=1, m_max=2, seed=0,
                          construction_template=SYNTHETIC_CONSTRUCTION_TEMPLATE)
    s = res.stats
    # Groups with 1..3 right answers out of 4 (7 of the 12) are candidates, with
    # min(2, wrong answers) pairs each: 2 + 2 + 1 + 2 + 2 + 1 + 2.
    assert s.questions == 12 and s.responses == 48 and s.candidates == 7
    assert s.pairs == len(calls) == 12
    assert s.constructed == s.pairs - sum(1 for i in range(s.pairs) if i % 5 == 1)
    assert s.parsed == s.constructed - sum(1 for i in range(s.pairs) if i % 5 == 2)
    assert s.verified == sum(1 for i in range(s.pairs) if i % 5 in (0, 4))
    assert s.kept_sft == s.kept_ift == s.verified and s.as_dict()["mean_fidelity"] == 1.0
    kept_calls = [c for i, c in enumerate(calls) if i % 5 in (0, 4)]
    for row, ift, (q, wrong, right) in zip(res.sft, res.ift, kept_calls):
        assert row["kind"] == "sft" and ift["kind"] == "ift"
        assert row["prompt"] == PROMPT_TEMPLATE.replace("{problem}", q)
        assert synthetic_grader([(row["response"], q and str(parse_problem(q).answer))]) == [True]
        assert ift["prompt"] == render_construction_prompt(q, wrong, right, SYNTHETIC_CONSTRUCTION_TEMPLATE)
        assert ift["response"] == rule(q, wrong, right)
        assert parse_construction(ift["response"]).reconstruction == row["response"]
    # The same build graded by a GradingPool, one batch.
    calls.clear()
    with GradingPool(num_workers=1) as pool:
        again = build_coldstart(qs, answers, responses, rewards, per_pair(flaky), pool_grader(pool),
                                n_pos=1, n_neg=1, m_max=2, seed=0,
                                construction_template=SYNTHETIC_CONSTRUCTION_TEMPLATE)
    assert again.sft == res.sft and again.ift == res.ift and again.stats == res.stats
    sft_path, ift_path = res.write(tmp_path)
    assert read_jsonl(sft_path) == res.sft and read_jsonl(ift_path) == res.ift
    assert len(res.examples) == 3 and "construction" in format_examples(res.examples)


def test_builder_selection_budget_and_fidelity_filters():
    qs, answers, responses, rewards = scripted_groups()
    rule = per_pair(rule_constructor())
    strict = build_coldstart(qs, answers, responses, rewards, rule, synthetic_grader,
                             n_pos=2, n_neg=2, m_max=4)
    assert strict.stats.candidates == 2  # exactly 2 right and 2 wrong out of 4
    assert strict.stats.pairs == 4 and strict.stats.kept_sft == 4
    # The paper's long built-in template, with a budget: every pair is over it.
    long = build_coldstart(qs, answers, responses, rewards, rule, synthetic_grader,
                           construction_template=DEFAULT_CONSTRUCTION_TEMPLATE,
                           count_tokens=len, max_prompt_tokens=1000)
    assert long.stats.too_long == long.stats.pairs > 0 and long.sft == [] and long.ift == []
    # Full reconstructions keep no prefix: fidelity 0, dropped by a fidelity floor.
    full = build_coldstart(qs, answers, responses, rewards, per_pair(rule_constructor(mode="full")),
                           synthetic_grader, min_fidelity=0.5)
    assert full.stats.verified > 0 and full.stats.low_fidelity == full.stats.verified
    assert full.sft == []
    # An analysis-free construction is an SFT row but not an IFT row.
    bare = build_coldstart(qs, answers, responses, rewards,
                           per_pair(lambda q, w, r: rule_constructor()(q, w, r).split("</analysis>")[1]),
                           synthetic_grader)
    assert bare.stats.kept_sft == bare.stats.verified - bare.stats.duplicates > 0
    assert bare.stats.kept_ift == 0
    # Duplicated wrong answers give one row.
    dup = build_coldstart([qs[1]], [answers[1]], [[responses[1][0], responses[1][1], responses[1][1]]],
                          [[1.0, 0.0, 0.0]], rule, synthetic_grader)
    assert dup.stats.verified == 2 and dup.stats.duplicates == 1 and dup.stats.kept_sft == 1
    with pytest.raises(ValueError):
        build_coldstart(qs, answers[:-1], responses, rewards, rule, synthetic_grader)


def test_builder_is_deterministic():
    args = scripted_groups(seed=3)
    a = build_coldstart(*args, per_pair(rule_constructor()), synthetic_grader, m_max=3, seed=9)
    b = build_coldstart(*args, per_pair(rule_constructor()), synthetic_grader, m_max=3, seed=9)
    assert a.sft == b.sft and a.ift == b.ift and a.stats == b.stats


def test_synthetic_grader_agrees_with_math_equal():
    cases = [("Final Answer: \\boxed{32}", "32"), ("\\boxed{-4}", "-4"), ("\\boxed{32}", "31"),
             ("no box", "3"), ("\\boxed{ 7 }", "7"), ("\\boxed{x}", "3"), ("\\boxed{3}", "\\boxed{3}")]
    assert synthetic_grader(cases) == [math_equal(r, g) for r, g in cases]


def test_the_synthetic_mix():
    mix = build_synthetic_mix(400, seed=0, proportions={"gold": 0.5, "sft": 0.3, "ift": 0.2})
    assert mix.counts == {"gold": 200, "sft": 120, "ift": 80}
    assert sorted(r["kind"] for r in mix.rows) == ["gold"] * 200 + ["ift"] * 80 + ["sft"] * 120
    assert set(mix.error_kinds) == set(ERROR_KINDS) and sum(mix.error_kinds.values()) == 200
    assert mix.rows == build_synthetic_mix(400, seed=0).rows
    assert mix.rows != build_synthetic_mix(400, seed=1).rows
    questions = set()
    for r in mix.rows:
        assert set(r) == {"prompt", "response", "kind"}
        if r["kind"] == "ift":
            q = r["prompt"].split("Problem: ")[1].split("\n")[0]
            validate_template(SYNTHETIC_CONSTRUCTION_TEMPLATE)
            rec = parse_construction(r["response"]).reconstruction
        else:
            q, rec = r["prompt"], r["response"]
        p = parse_problem(q)
        assert split_of(p.text) == "train"  # never a held-out problem
        questions.add(p.text)
        assert synthetic_grader([(rec, str(p.answer))]) == [True]
        assert ("Wait, let me double-check" in rec) == (r["kind"] != "gold")
    assert len(questions) == 400  # every row its own problem
    assert mix_counts(7, {"gold": 1, "sft": 1, "ift": 1}) == {"gold": 3, "sft": 2, "ift": 2}
    assert build_synthetic_mix(10, proportions={"gold": 1}).counts == {"gold": 10, "sft": 0, "ift": 0}
    with pytest.raises(ValueError):
        mix_counts(10, {"bogus": 1})
    full = build_synthetic_mix(20, seed=0, mode="full", proportions={"sft": 1})
    assert all("Wait" not in r["response"] for r in full.rows)


def test_cli_make_data(tmp_path, capsys):
    out = tmp_path / "syn"
    assert cli_main(["make-data", "--out", str(out), "--train", "300", "--test", "50", "--seed", "0",
                     "--steps", "2", "4", "--digits", "1", "--coldstart", "100"]) == 0
    train, test, mix = (read_jsonl(out / f) for f in ("train.jsonl", "test.jsonl", "coldstart.jsonl"))
    assert len(train) == 300 and len(test) == 50 and len(mix) == 100
    assert train == generate_dataset(300, 0, split="train")
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    mix_problems = {parse_problem(r["prompt"]).text for r in mix}
    assert not mix_problems & {r["problem"] for r in train}  # disjoint by default
    assert (out / "construction_template.txt").read_text() == SYNTHETIC_CONSTRUCTION_TEMPLATE
    assert json.loads((out / "meta.json").read_text())["coldstart"] == {"gold": 50, "sft": 30, "ift": 20}
    assert "coldstart.jsonl 100" in capsys.readouterr().out
    assert cli_main(["make-data", "--out", str(out), "--train", "5", "--test", "500", "--steps", "1",
                     "--operators", "+"]) == 2


# --------------------------------------------------------------------------- token lengths


def test_token_lengths_with_the_tiny_tokenizer():
    from tapo_ds.modeling import build_tiny_tokenizer

    tok = build_tiny_tokenizer()

    def n_tokens(texts):
        n = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return statistics.fmean(n), max(n)

    rows = generate_dataset(300, seed=0)
    mix = build_synthetic_mix(300, seed=0, proportions={"sft": 1, "ift": 1})
    stats = {
        "problem": n_tokens([r["problem"] for r in rows]),
        "solution": n_tokens([r["solution"] for r in rows]),
        "sft response": n_tokens([r["response"] for r in mix.rows if r["kind"] == "sft"]),
        "ift prompt": n_tokens([r["prompt"] for r in mix.rows if r["kind"] == "ift"]),
        "ift response": n_tokens([r["response"] for r in mix.rows if r["kind"] == "ift"]),
    }
    print({k: (round(m, 1), mx) for k, (m, mx) in stats.items()})
    # Phrase tokens are used: "Step " is one token, "\\boxed{" one, the reflection phrase one.
    assert tok.tokenize("Step 1: 7+5=12")[0] == "Step "
    assert "Wait, let me double-check" in tok.tokenize(mix.rows[0]["response"])
    assert stats["problem"][1] <= 24 and stats["solution"][1] <= 60
    assert stats["sft response"][1] <= 90 and stats["ift prompt"][1] <= 220
    assert stats["ift response"][1] <= 160


# --------------------------------------------------------------------------- the writer's own checks (issue 8)

Q4 = "From 4: +3, -3, -3, +7."  # 7, 4, 1, 8


def test_diagnose_reads_the_writers_own_checks():
    # a harmless re-check of a right step is kept in the prefix; the mistake is step 4
    own = ("Step 1: 4+3=7\nStep 2: 7-3=4\nWait, let me double-check step 2: 7-3=4.\nStep 3: 4-3=1\n"
           "Step 4: 1+7=7\nFinal Answer: \\boxed{7}")
    d = diagnose(Q4, own)
    assert (d.step, d.kind) == (4, "arithmetic") and d.prefix == own.split("\nFinal")[0]
    # a wrong step corrected by the very next check is not the critical mistake
    fixed = ("Step 1: 4+3=8\nWait, let me double-check step 1: 4+3=7.\nStep 2: 7-3=4\nStep 3: 4-3=2\n"
             "Step 4: 2+7=9\nFinal Answer: \\boxed{9}")
    d = diagnose(Q4, fixed)
    assert (d.step, d.kind) == (3, "arithmetic") and d.prefix.endswith("Step 3: 4-3=2")
    # a check that gets a right step wrong is itself the mistake
    bad = "Step 1: 4+3=7\nWait, let me double-check step 1: 4+3=8.\nStep 2: 8-3=5\nFinal Answer: \\boxed{5}"
    d = diagnose(Q4, bad)
    assert d.step == 1 and d.prefix.endswith("4+3=8.") and d.reflection.endswith("step 1: 4+3=7.")
    # a wrong step followed by a wrong check: the step is the mistake
    d = diagnose(Q4, "Step 1: 4+3=8\nWait, let me double-check step 1: 4+3=9.\nFinal Answer: \\boxed{9}")
    assert d.step == 1 and d.prefix == "Step 1: 4+3=8"
    # the next step written as a check counts as written; a right solution with checks has nothing to fix
    right = ("Step 1: 4+3=7\nWait, let me double-check step 2: 7-3=4.\nStep 3: 4-3=1\nStep 4: 1+7=8\n"
             "Final Answer: \\boxed{8}")
    assert diagnose(Q4, right) is None
    # the rule construction keeps the prefix verbatim: fidelity 1.0 although y⁻ writes "Wait" itself
    for wrong in (own, fixed, bad):
        rec = parse_construction(construct(Q4, wrong)).reconstruction
        assert prefix_fidelity(rec, wrong) == 1.0, (wrong, rec)
        assert last_boxed(rec) == "8"


def test_with_check_inserts_a_right_recheck():
    from tapo_ds.synthetic.mix import with_check

    rng = random.Random(0)
    text = EXAMPLE.solution
    assert with_check(text, 3, rng, 0.0) == text
    out = with_check(text, 2, rng, 1.0)
    lines = out.split("\n")
    assert len(lines) == 5 and lines[-1] == text.split("\n")[-1]
    check = next(x for x in lines if x.startswith("Wait"))
    assert check in ("Wait, let me double-check step 1: 7+5=12.", "Wait, let me double-check step 2: 12*3=36.")
    assert diagnose(EXAMPLE.text, out) is None  # still a right solution
    mix = build_synthetic_mix(60, seed=0, proportions={"ift": 1}, check_rate=0.5, analysis="checked")
    assert any("Wait" in r["prompt"].split("Right:")[0] for r in mix.rows)
    assert mix.build.verified == 60 and mix.build.as_dict()["mean_fidelity"] == 1.0


@pytest.mark.parametrize("analysis", ["brief", "parted"])
def test_mix_slip_rate_spoils_only_the_correction(analysis):
    """IFT rows with a slip keep the analysis, the copied prefix and the reflection of the row they replace,
    and end at a wrong answer; every other row is the row of the mix without slips."""
    knobs = dict(seed=3, proportions={"gold": 0.2, "sft": 0.2, "ift": 0.6}, steps=(2, 5), max_value=200,
                 analysis=analysis)
    plain = build_synthetic_mix(200, **knobs)
    slipped = build_synthetic_mix(200, slip_rate=0.4, **knobs)
    assert plain.slipped == 0 and 0.3 * 120 <= slipped.slipped <= 0.5 * 120
    changed = 0
    for a, b in zip(plain.rows, slipped.rows):
        assert a["prompt"] == b["prompt"] and a["kind"] == b["kind"]
        if a == b:
            continue
        changed += 1
        assert a["kind"] == "ift"
        pa, pb = parse_construction(a["response"]), parse_construction(b["response"])
        assert pa.analysis == pb.analysis
        head_a, head_b = (c.reconstruction.split("Wait, let me double-check")[0] for c in (pa, pb))
        assert head_a == head_b
        answer = str(parse_problem(a["prompt"]).answer)
        assert synthetic_grader([(pa.reconstruction, answer), (pb.reconstruction, answer)]) == [True, False]
    assert changed == slipped.slipped
    with pytest.raises(ValueError, match="slip_rate"):
        build_synthetic_mix(10, slip_rate=1.5)


def test_cli_make_data_phase2_and_separate_mix_knobs(tmp_path):
    out = tmp_path / "syn"
    args = ["make-data", "--out", str(out), "--train", "200", "--test", "20", "--seed", "0", "--steps", "3", "4",
            "--max-value", "100", "--coldstart-steps", "2", "5", "--coldstart-first", "--coldstart", "60",
            "--phase2", "40", "--phase2-mix", "gold=0.25,ift=0.75", "--phase2-check-rate", "0.5"]
    assert cli_main(args) == 0
    train, test, mix, mix2 = (read_jsonl(out / f) for f in ("train.jsonl", "test.jsonl", "coldstart.jsonl",
                                                             "coldstart_phase2.jsonl"))
    assert len(mix) == 60 and len(mix2) == 40 and sum(r["kind"] == "ift" for r in mix2) == 30
    assert all(3 <= len(parse_problem(r["problem"]).ops) <= 4 for r in train + test)
    mix_problems = {parse_problem(r["prompt"]).text for r in mix + mix2}
    assert not mix_problems & {r["problem"] for r in train + test}
    # the first mix does not depend on the RL split's knobs
    out2 = tmp_path / "syn2"
    assert args[9:12] == ["--steps", "3", "4"]
    assert cli_main([a if a != str(out) else str(out2) for a in args[:10]] + ["4", "5"] + args[12:]) == 0
    assert read_jsonl(out2 / "coldstart.jsonl") == mix
    assert cli_main(["make-data", "--out", str(out), "--phase2", "10"]) == 2  # needs --coldstart-first


# --------------------------------------------------------------------------- the constructor probe (issue 8)


def test_reflection_located():
    from tapo_ds.synthetic.probe import reflection_located

    wrong = "Step 1: 4+3=7\nStep 2: 7-3=5\nStep 3: 5-3=2\nStep 4: 2+7=9\nFinal Answer: \\boxed{9}"
    good = "Step 1: 4+3=7\nStep 2: 7-3=5\nWait, let me double-check step 2: 7-3=4.\nStep 3: 4-3=1\nStep 4: 1+7=8"
    late = "Step 1: 4+3=7\nStep 2: 7-3=5\nStep 3: 5-3=2\nWait, let me double-check step 3: 4-3=1.\nStep 4: 1+7=8"
    assert reflection_located(Q4, wrong, good) is True
    assert reflection_located(Q4, wrong, late) is False
    assert reflection_located(Q4, wrong, "Step 1: 4+3=7\nFinal Answer: \\boxed{8}") is False  # no reflection
    assert reflection_located(Q4, Problem(4, (("+", 3), ("-", 3), ("-", 3), ("+", 7))).solution, good) is None


def test_location_diagnostics():
    from tapo_ds.synthetic.probe import reflection_at_first_difference, reflection_offset

    wrong = "Step 1: 4+3=7\nStep 2: 7-3=5\nStep 3: 5-3=2\nStep 4: 2+7=9\nFinal Answer: \\boxed{9}"
    right = "Step 1: 4+3=7\nStep 2: 7-3=4\nStep 3: 4-3=1\nStep 4: 1+7=8\nFinal Answer: \\boxed{8}"
    lucky = "Step 1: 4+3=8\nStep 2: 8-3=4\nStep 3: 4-3=1\nStep 4: 1+7=8\nFinal Answer: \\boxed{8}"
    good = "Step 1: 4+3=7\nStep 2: 7-3=5\nWait, let me double-check step 2: 7-3=4.\nStep 3: 4-3=1\nStep 4: 1+7=8"
    late = "Step 1: 4+3=7\nStep 2: 7-3=5\nStep 3: 5-3=2\nWait, let me double-check step 3: 4-3=1.\nStep 4: 1+7=8"
    early = "Step 1: 4+3=7\nWait, let me double-check step 1: 4+3=7.\nStep 2: 7-3=4\nStep 3: 4-3=1\nStep 4: 1+7=8"
    assert [reflection_offset(Q4, wrong, c) for c in (good, late, early)] == [0, 1, -1]
    assert reflection_offset(Q4, wrong, "Step 1: 4+3=7") == "no reflection"
    assert reflection_offset(Q4, right, good) == "no mistake"
    assert reflection_at_first_difference(wrong, right, good) is True
    # y⁺ right by luck (its step 1 is wrong): comparing with it points at step 1, not at y⁻'s mistake
    assert reflection_at_first_difference(wrong, lucky, good) is False
    assert reflection_at_first_difference(wrong, lucky, "Step 1: 4+3=7\nWait, let me double-check step 1: 4+3=8.")
    assert reflection_at_first_difference(wrong, wrong, good) is None


def _sampled(n_questions=30, seed=0):
    """Scripted K=8 answers per question: right ones and model-like wrong ones (some with own checks)."""
    from tapo_ds.synthetic.mix import with_check

    rng = random.Random(seed)
    probs = problems(n_questions, seed=seed, steps=(3, 5), max_value=200)
    texts, rewards = [], []
    for p in probs:
        n_right = rng.randint(2, 4)
        resp = [with_check(p.solution, len(p.ops), rng, 0.3) for _ in range(n_right)]
        for _ in range(8 - n_right):
            w = random_wrong_solution(p, rng)
            resp.append(with_check(w.text, w.step - 1, rng, 0.3))
        texts.append(resp)
        rewards.append([1.0] * n_right + [0.0] * (8 - n_right))
    return [p.text for p in probs], [str(p.answer) for p in probs], texts, rewards


def test_probe_measures_with_the_rule_constructor_standing_in():
    from tapo_ds.synthetic.probe import summarize

    questions, answers, texts, rewards = _sampled()
    rule = rule_constructor("micro", "checked")

    def by_rule(prompts):
        out = []
        for prompt in prompts:
            q = parse_problem(prompt).text
            wrong = prompt.split("Wrong:\n")[1].split("\nRight:\n")[0]
            out.append(rule(q, wrong, ""))
        return out

    kw = dict(n_pos=2, n_neg=4, m_max=4, template=SYNTHETIC_CONSTRUCTION_TEMPLATE, budget_tokens=None,
              count_tokens=None, answers=answers, seed=0)
    rep = summarize(questions, texts, rewards, construct=by_rule, **kw)
    assert rep.candidates == 30 and rep.pairs == 120
    assert rep.parse_rate == 1.0 and rep.construction_acc == 1.0
    assert rep.prefix_fidelity_median == 1.0 and rep.prefix_fidelity_mean == 1.0
    assert rep.reflection_located == 1.0 and rep.reflection_offsets == {"0": 1.0}
    assert rep.right_steps_correct == 1.0 and rep.reflection_located_steps_correct == 1.0
    assert rep.reflection_at_first_difference == 1.0
    assert rep.construction_acc_located == 1.0 and rep.construction_acc_elsewhere is None
    assert rep.reflected_groups == 30 and rep.reflected_mixed_frac == 0.0  # all right: no group is mixed
    assert "| output parses | 100.0 % |" in rep.table()
    # a constructor that fails every other time: half the outputs do not parse
    rep = summarize(questions, texts, rewards,
                    construct=lambda ps: [o if i % 2 else "garbage" for i, o in enumerate(by_rule(ps))], **kw)
    assert rep.parse_rate == 0.5 and rep.construction_acc == 1.0

    # reflecting one line late (the wrong line kept, then the next one of y⁻ too) while still ending right
    def late(prompts):
        out = []
        for prompt, text in zip(prompts, by_rule(prompts)):
            wrong_lines = prompt.split("Wrong:\n")[1].split("\nRight:\n")[0].split("\n")
            recon = parse_construction(text).reconstruction.split("\n")
            k = next(i for i, line in enumerate(recon) if line.startswith("Wait"))
            if k < len(wrong_lines) - 1 and wrong_lines[k].startswith("Step"):
                recon.insert(k, wrong_lines[k])
            out.append(text.split("<reconstruction>")[0] + "<reconstruction>" + "\n".join(recon)
                       + "</reconstruction>")
        return out

    rep = summarize(questions, texts, rewards, construct=late, **kw)
    assert 0.0 < rep.reflection_located < 1.0
    assert rep.construction_acc_located == 1.0 and rep.construction_acc_elsewhere == 1.0
    assert "where it is elsewhere 100.0 %" in rep.table()


def test_probe_cli_runs_on_a_tiny_model(tmp_path, capsys):
    from tapo_ds.modeling import build_tiny_model_and_tokenizer

    model, tok = build_tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "probe.md"
    # the rule constructor on a random model's answers: whatever pairs there are, they score perfectly
    assert cli_main(["probe-constructor", "--model", str(tmp_path / "m"), "--questions", "4", "--constructor",
                     "rule", "--eval-samples", "2", "--threads", "1", "--set", "rollout.max_new_tokens=24",
                     "--set", "evaluation.max_new_tokens=8", "--set", "tapo.n_pos=1", "--set", "tapo.n_neg=1",
                     "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["questions"] == 4 and data["samples_per_question"] == 8
    assert data["eval_pass_at_1"] is not None and 0.0 <= data["eval_pass_at_1"] <= 1.0
    assert "probe-constructor --model" in out.read_text()
    assert cli_main(["probe-constructor", "--model", str(tmp_path / "m"), "--questions", "2", "--eval-samples", "0",
                     "--threads", "1", "--set", "rollout.max_new_tokens=8", "--set", "rollout.samples_per_question=6",
                     "--set", "tapo.max_new_tokens=8"]) == 0
    assert "| output parses |" in capsys.readouterr().out


def test_injected_answers_are_gold_and_one_mistake_each():
    from tapo_ds.synthetic.constructor import diagnose
    from tapo_ds.synthetic.probe import injected_answers

    qs = [p.text for p in problems(5, seed=3, steps=(3, 5), max_value=200)]
    texts, rewards = injected_answers(qs, 8, seed=0)
    assert [len(t) for t in texts] == [8] * 5 and all(r == [1.0, 1.0] + [0.0] * 6 for r in rewards)
    for q, answers in zip(qs, texts):
        assert all(diagnose(q, a) is None for a in answers[:2])       # gold: nothing to construct
        assert all(diagnose(q, a) is not None for a in answers[2:])   # each wrong one has a readable mistake
    assert injected_answers(qs, 8, seed=0) == (texts, rewards)        # seeded
