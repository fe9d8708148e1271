"""Tests of tapo_ds.reward: last-box extraction, math-verify equivalences, and the grading
pool's bounds (hard timeouts, crashes, hostile answers). No torch, no network."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from tapo_ds import reward
from tapo_ds.answer_forms import plain_form
from tapo_ds.answer_size import MAX_VALUE_DIGITS, refusal_reason, value_digits
from tapo_ds.reward import (
    MAX_ANSWER_CHARS,
    GradeResult,
    GradingPool,
    last_boxed,
    math_equal,
)

# 9^(9^(9^9)): sympy tries to evaluate it exactly (hours, in C code that ignores signals).
POWER_TOWER = "\\boxed{9^{9^{9^9}}}"
# Under the length cap, but the LaTeX parser needs far more than a second for it.
NESTED_2000 = "\\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}"


@pytest.fixture(scope="module")
def pool():
    with GradingPool(num_workers=2, timeout=5.0) as p:
        yield p


@pytest.fixture
def no_structural_check(monkeypatch):
    """Hostile answers reach the workers: for tests of the pool's last line of defence
    (kill timeout, crash recovery, memory cap), which the parent's refusal would skip."""
    monkeypatch.setattr(reward, "_refused", lambda answer, gold: False)


# --------------------------------------------------------------------------- last_boxed


@pytest.mark.parametrize("text, expected", [
    ("The answer is \\boxed{204}.", "204"),
    ("First \\boxed{204}, but rechecking, \\boxed{240}.", "240"),  # last box wins
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not grouping
    ("so \\fbox{7}", "7"),
    ("\\boxed{1} and \\fbox{2}", "2"),
    ("\\boxed {3}", "3"),
    ("\\boxed{a \\\\}", "a \\\\"),  # \\ is a line break, the } after it closes the box
    ("\\boxed{}", ""),
    ("no box here", None),
    ("\\boxed{2\\sqrt{3}", None),  # unclosed: no answer
    ("\\boxed{1} then \\boxed{2", None),  # the last box is broken: the earlier one is not used
    ("\\boxed 5", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_is_linear_on_megabyte_inputs():
    inputs = [
        "x" * 1_000_000 + "\\boxed{1}",
        "\\boxed{" * 150_000,  # a million characters of unclosed boxes
        "\\boxed{" + "{" * 500_000 + "}" * 500_000 + "}",
        "\\boxed{" + "\\{" * 500_000,
    ]
    start = time.perf_counter()
    results = [last_boxed(s) for s in inputs]
    assert time.perf_counter() - start < 2.0
    assert results[0] == "1" and results[1] is None and len(results[2]) == 1_000_000
    assert results[3] is None


# --------------------------------------------------------------------------- equivalences

EQUIVALENT = [
    ("\\boxed{204}", "204"),
    ("204", "204"),  # bare answer
    ("Adding the two gives 204, so the walk takes \\boxed{204} minutes.", "204"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac12"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
    ("\\boxed{0.75}", "\\dfrac{3}{4}"),
    ("\\boxed{(1,2]}", "(1, 2]"),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)"),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}"),
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{5 \\text{ cm}}", "5"),
    ("\\fbox{7}", "7"),
    ("$x = \\boxed{113}$.", "113"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{x^2+1}", "1+x^2"),
    ("\\boxed{0.75}", "The answer is \\boxed{\\frac34}."),  # gold with a box: its box is used
]

DIFFERENT = [
    ("\\boxed{205}", "204"),
    ("First \\boxed{204}, but rechecking, \\boxed{240}.", "204"),  # last box wins
    ("\\boxed{240} was wrong, the answer is \\boxed{204}.", "240"),
    ("\\boxed{(1,2)}", "(1, 2]"),
    ("\\boxed{\\{1,3\\}}", "\\{1,2\\}"),
    ("\\boxed{0.5}", "\\frac13"),
    ("\\boxed{3\\sqrt{2}}", "2\\sqrt{3}"),
    ("\\boxed{-204}", "204"),
    ("\\boxed{2\\sqrt{3}", "2\\sqrt{3}"),  # unclosed box
    ("\\boxed{}", "25"),
    ("", "25"),
    ("The reasoning goes on and on. " * 10 + "So it is 204.", "204"),  # long, no box
]


@pytest.mark.parametrize("prediction, gold", EQUIVALENT)
def test_equivalent(prediction, gold):
    assert math_equal(prediction, gold)


@pytest.mark.parametrize("prediction, gold", DIFFERENT)
def test_different(prediction, gold):
    assert not math_equal(prediction, gold)


# --------------------------------------------------------------------------- percent and degree forms


@pytest.mark.parametrize("written, plain", [
    ("50\\%", "50"),
    ("50 \\%", "50"),
    ("50%", "50"),
    ("50 %", "50"),
    ("50\\,\\%", "50"),
    ("50\\ \\%", "50"),
    ("50\\text{\\%}", "50"),
    ("-12.5\\%", "-12.5"),
    ("\\frac{1}{2}\\%", "\\frac{1}{2}"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("30 ^ { \\circ }", "30"),
    ("30°", "30"),
    ("30 °", "30"),
    ("30\\degree", "30"),
    ("30\\text{ degrees}", "30"),
    ("30\\text{degrees}", "30"),
    ("1\\text{ degree}", "1"),
    ("25^\\circ C", "25"),  # a temperature unit goes with its degree mark
    ("25°F", "25"),
    ("25^{\\circ}\\text{C}", "25"),
    ("30^\\circ, 60^\\circ", "30, 60"),  # each value of a list
    ("(10\\%, 20\\%]", "(10, 20]"),
    ("\\{30^\\circ, 45^\\circ\\}", "\\{30, 45\\}"),
    ("\\left(30^\\circ\\right)", "\\left(30\\right)"),
    ("$50\\%$", "$50$"),
    # left alone: no value before the mark, or the mark does not end a value
    ("\\%", "\\%"),
    ("50\\% off", "50\\% off"),
    ("x\\%y", "x\\%y"),
    ("f \\circ g", "f \\circ g"),
    ("204", "204"),
    ("\\frac{9\\sqrt{3}}{2}", "\\frac{9\\sqrt{3}}{2}"),
])
def test_plain_form(written, plain):
    assert plain_form(written) == plain


# Each pair is graded both ways round, boxed and bare.
UNIT_EQUAL = [
    ("50\\%", "50"),
    ("50 \\%", "50"),
    ("50%", "50"),
    ("50 %", "50"),
    ("50\\%", "50%"),
    ("50\\%", "50 \\%"),
    ("50\\,\\%", "50"),
    ("12.5\\%", "\\frac{25}{2}"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("30°", "30"),
    ("30°", "30^\\circ"),
    ("30°", "30^{\\circ}"),
    ("30\\text{ degrees}", "30"),
    ("30\\text{degrees}", "30°"),
    ("25^\\circ C", "25"),
    ("30^\\circ, 60^\\circ", "30, 60"),
]
UNIT_DIFFERENT = [
    ("50\\%", "0.5"),  # percent is the number written, not a hundredth of it (answer_forms docstring)
    ("50\\%", "\\frac{1}{2}"),
    ("50\\%", "51"),
    ("50%", "5"),
    ("30^\\circ", "\\frac{\\pi}{6}"),  # degrees are not converted to radians
    ("30°", "60"),
    ("30^\\circ, 60^\\circ", "30, 45"),
]


def _both_ways(a, b):
    return [(f"\\boxed{{{a}}}", b), (f"\\boxed{{{b}}}", a), (a, b), (b, a)]


@pytest.mark.parametrize("a, b", UNIT_EQUAL)
def test_percent_and_degree_forms_equal_plain_forms(pool, a, b):
    res = pool.grade(_both_ways(a, b))
    assert res.correct == [True] * 4 and res.errors == 0 and res.refused == 0


@pytest.mark.parametrize("a, b", UNIT_DIFFERENT)
def test_percent_and_degree_forms_keep_their_value(pool, a, b):
    assert pool.grade(_both_ways(a, b)).correct == [False] * 4


# --------------------------------------------------------------------------- hostile answers


def _injections(marker):
    code = f"__import__('os').system('touch {marker}')"
    return [f"\\boxed{{{code}}}", code, f"\\boxed{{1+{code}}}", f"\\boxed{{\\text{{{code}}}}}",
            f"$\\boxed{{eval(\"{code}\")}}$", f"\\boxed{{exec('import os; os.system(\"touch {marker}\")')}}"]


@pytest.mark.parametrize("response", [
    POWER_TOWER,
    NESTED_2000,
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",  # over the length cap
    "\\boxed{" + "1+" * 500_000 + "1}",  # a 1 MB answer
    "1" * 1_000_000,  # a 1 MB response without a box
])
def test_hostile_answers_are_wrong_in_bounded_time(response):
    start = time.perf_counter()
    assert not math_equal(response, "1", timeout=1.0)
    # 1 s limit, plus at most a worker restart left over from the previous case
    assert time.perf_counter() - start < 15.0


def test_model_output_is_never_executed(tmp_path):
    marker = tmp_path / "pwned_tapo"
    for response in _injections(marker):
        assert not math_equal(response, "0", timeout=2.0)
    assert not marker.exists()


# --------------------------------------------------------------------------- structural refusal

# Reference answers as they appear in AIME 2024/2025 and HMMT Feb 2025, and other legitimate
# forms: none is refused, each grades True against itself.
LEGIT_ANSWERS = [
    "204", "-984", "2304", "\\frac{1311}{2017}", "\\frac{9 \\sqrt{23}}{23}", "2^{25} \\cdot 26!",
    "14+4\\sqrt{37}", "1-\\frac{2}{\\pi}", "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}",
    "\\sqrt{\\frac{95}{24}}", "\\sqrt{23}-2 \\sqrt{3}", "8\\sqrt{10}",
    "\\frac{9\\sqrt{3}}{2}", "2^{2025}", "3^{100}-1", "\\binom{2025}{2}", "\\dbinom{10}{5}", "26!", "5!!",
    "x^{2025}+1", "\\left(\\frac{1+\\sqrt{5}}{2}\\right)^{2}", "(1, 2]", "\\{1, 2\\}", "[0, \\infty)",
    "\\frac{1}{1+\\frac{1}{1+\\frac{1}{1+\\frac{1}{1+\\frac{1}{2}}}}}", "\\sqrt{2+\\sqrt{2+\\sqrt{2+\\sqrt{2}}}}",
    "\\left\\{\\left(\\frac{1}{2}, \\frac{\\sqrt{3}}{2}\\right)\\right\\}", "2^{2^{10}}", "10^{-9}", "1.5 \\times 10^{9}",
    "e^{i\\pi}", "\\sqrt[3]{2}", "{10 \\choose 3}",
]

# The ones that would hold a worker for the whole kill timeout (or far longer).
ASTRONOMICAL = [
    "9^{9^{9^9}}", "9^9^9^9", "9**9**9", "2^{2^{32}}", "2^{2^{2^{2^{2^{2}}}}}", "x^{x^{x^{9}}}",
    "1000000!", "100000!", "(10^{6})!", "2^{20}!", "100!!",
    "\\binom{10^{100}}{10^{50}}", "{10^{10} \\choose 10^{9}}",
    "2^{99999999999}", "10^{" + "9" * 40 + "}", "2^{-10^{10}}", "\\frac{1}{3}^{10^{10}}",
    "{" * 2000 + "1" + "}" * 2000,  # under the length cap, exponential for the parser
    "{" * 7 + "1" + "}" * 7,
    "(" * 7 + "1" + ")" * 7,
    "\\sqrt{" * 17 + "2" + "}" * 17,
]


@pytest.mark.parametrize("answer", LEGIT_ANSWERS)
def test_legitimate_answers_are_not_refused(answer):
    assert refusal_reason(answer) is None
    assert value_digits(answer) < MAX_VALUE_DIGITS / 20  # far inside: x^{2025} counts 2025, the most here


@pytest.mark.parametrize("answer", ASTRONOMICAL)
def test_astronomical_answers_are_refused(answer):
    reason = refusal_reason(answer)
    assert reason is not None and ("digits" in reason or "nesting" in reason)


@pytest.mark.parametrize("answer, digits", [
    ("2^{2025}", 2025 * math.log10(2)),
    ("26!", math.log10(math.factorial(26))),
    ("\\binom{2025}{2}", math.log10(math.comb(2025, 2))),
    ("2^{2^{2^{2^{2}}}}", 65536 * math.log10(2)),  # a tower of small numbers is still exact-ish
    ("(10^{5})!", math.log10(math.factorial(10**5) // 10**456000) + 456000),
])
def test_value_digits_is_an_upper_bound_not_far_off(answer, digits):
    assert digits <= value_digits(answer) <= 2 * digits + 2


def test_refusal_is_linear_on_answers_at_the_length_cap():
    n = MAX_ANSWER_CHARS // 2
    inputs = ["1+" * n, "(" * n + ")" * n, "2^" * n + "2", "x_" * n, "9!" * n, "\\frac{1}{" * (n // 5),
              "\\sqrt" * (n // 3), "{\\choose}" * (n // 5)]
    start = time.perf_counter()
    reasons = [refusal_reason(s) for s in inputs]
    assert time.perf_counter() - start < 1.0
    assert [r is not None for r in reasons] == [False, True, True, False, False, True, False, False]


def test_legitimate_answers_grade_true_against_themselves(pool):
    res = pool.grade([(f"\\boxed{{{a}}}", a) for a in LEGIT_ANSWERS])
    assert res.correct == [True] * len(LEGIT_ANSWERS)
    assert res.refused == 0 and res.timeouts == 0


@pytest.mark.parametrize("response, counted", [
    ("\\boxed{9^{9^{9^9}}}", "refused"),
    ("\\boxed{1000000!}", "refused"),
    ("\\boxed{\\binom{10^{100}}{10^{50}}}", "refused"),
    (NESTED_2000, "refused"),
    ("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "errors"),  # over the length cap
    ("\\boxed{" + "1+" * 500_000 + "1}", "errors"),  # a 1 MB answer
])
def test_astronomical_answers_do_not_wait_for_the_kill_timeout(pool, response, counted):
    start = time.perf_counter()
    res = pool.grade([(response, "1")])  # the pool's kill timeout is 5 s
    # well under the 5 s kill; 1 s leaves a 5x margin on a loaded machine
    assert time.perf_counter() - start < 1.0
    assert res.correct == [False] and res.timeouts == 0 and getattr(res, counted) == 1


def test_a_refused_reference_refuses_the_pair(pool):
    res = pool.grade([("\\boxed{1}", "9^{9^{9^9}}"), ("\\boxed{2}", "2")])
    assert res.correct == [False, True] and res.refused == 1


def test_the_bound_sits_above_legitimate_sizes():
    # 2^{10^5} (30 103 digits) still goes to math-verify; 10^{10^5} + 1 digits does not
    assert refusal_reason("2^{100000}") is None
    assert refusal_reason(f"10^{{{MAX_VALUE_DIGITS}}}") is not None


# --------------------------------------------------------------------------- the pool


def test_batch_of_64_in_order(pool):
    labelled = [(p, g, True) for p, g in EQUIVALENT] + [(p, g, False) for p, g in DIFFERENT]
    rows = [labelled[i % len(labelled)] for i in range(64)]
    random.Random(0).shuffle(rows)
    res = pool.grade([(p, g) for p, g, _ in rows])
    assert res.correct == [label for _, _, label in rows]
    assert res.timeouts == 0
    assert res.no_box == sum(last_boxed(p) is None for p, _, _ in rows)


def test_counts(pool):
    res = pool.grade([
        ("\\boxed{204}", "204"),
        ("a long response without a box " * 10, "204"),  # no box: wrong, not an error
        ("\\boxed{\\frac{1}{}}", "1"),  # unparseable answer: error
        ("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}", "1"),  # over the cap: error, not parsed
        ("\\boxed{3}", ""),  # empty gold: error
    ])
    assert res == GradeResult(correct=[True, False, False, False, False], timeouts=0, errors=3, no_box=1)
    assert pool.grade([]) == GradeResult(correct=[])


def test_timeout_is_counted_and_the_pool_recovers(pool, no_structural_check):
    res = pool.grade([(POWER_TOWER, "1")], timeout=0.05)
    assert res == GradeResult(correct=[False], timeouts=1, errors=0, no_box=0)
    # the killed worker is replaced; the next batch (default 5 s limit) is graded normally
    res = pool.grade([("\\boxed{\\dfrac{3}{4}}", "0.75"), ("\\boxed{2}", "3")] * 4)
    assert res.correct == [True, False] * 4 and res.timeouts == 0 and res.errors == 0


def test_worker_crash_is_an_error_and_the_pool_recovers(pool, no_structural_check):
    def kill_busy_workers():
        # kill both workers while they grade the power towers (they would never finish)
        deadline = time.monotonic() + 60
        while not all(w.task is not None for w in pool._workers):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for w in pool._workers:
            os.kill(w.proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_busy_workers)
    killer.start()
    start = time.perf_counter()
    res = pool.grade([(POWER_TOWER, "1")] * 2, timeout=60.0)
    killer.join()
    assert time.perf_counter() - start < 30.0
    assert res == GradeResult(correct=[False, False], timeouts=0, errors=2, no_box=0)
    assert pool.grade([("\\boxed{7}", "7")]).correct == [True]


def test_closed_pool():
    p = GradingPool(num_workers=1, timeout=5.0)
    procs = [w.proc for w in p._workers]
    p.close()
    p.close()  # idempotent
    assert p.closed and not any(proc.is_alive() for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        p.grade([("\\boxed{1}", "1")])


def test_module_does_not_import_torch():
    code = "import sys, tapo_ds.reward; assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)


def test_memory_bomb_is_capped(no_structural_check):
    """2^(2^32) needs 512 MB as an exact integer: with the worker's address space capped it fails fast
    (wrong, bounded) instead of growing until the time limit; the pool keeps working."""
    with GradingPool(num_workers=1, timeout=30, memory_mb=64) as pool:
        t0 = time.monotonic()
        result = pool.grade([("\\boxed{2^{2^{32}}}", "1"), ("\\boxed{2}", "2")])
        assert result.correct == [False, True]
        assert result.timeouts == 0 and time.monotonic() - t0 < 25
