"""Tests of tapo_ds.reward: last-box extraction, math-verify equivalences, and the grading
pool's bounds (hard timeouts, crashes, hostile answers). No torch, no network."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from tapo_ds.reward import (
    MAX_ANSWER_CHARS,
    GradeResult,
    GradingPool,
    compute_score,
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
    assert compute_score(prediction, gold) == 1.0


@pytest.mark.parametrize("prediction, gold", DIFFERENT)
def test_different(prediction, gold):
    assert not math_equal(prediction, gold)
    assert compute_score(prediction, gold) == 0.0


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


# --------------------------------------------------------------------------- the pool


def test_batch_of_64_in_order(pool):
    labelled = [(p, g, True) for p, g in EQUIVALENT] + [(p, g, False) for p, g in DIFFERENT]
    rows = [labelled[i % len(labelled)] for i in range(64)]
    random.Random(0).shuffle(rows)
    res = pool.grade([(p, g) for p, g, _ in rows])
    assert res.correct == [label for _, _, label in rows]
    assert res.timeouts == 0
    assert res.no_box == sum(last_boxed(p) is None for p, _, _ in rows)


def test_counts_and_metrics(pool):
    res = pool.grade([
        ("\\boxed{204}", "204"),
        ("a long response without a box " * 10, "204"),  # no box: wrong, not an error
        ("\\boxed{\\frac{1}{}}", "1"),  # unparseable answer: error
        ("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}", "1"),  # over the cap: error, not parsed
        ("\\boxed{3}", ""),  # empty gold: error
    ])
    assert res == GradeResult(correct=[True, False, False, False, False], timeouts=0, errors=3, no_box=1)
    assert res.metrics() == {"reward/accuracy": 0.2, "reward/timeout_rate": 0.0,
                             "reward/error_rate": 0.6, "reward/no_box_rate": 0.2}
    empty = pool.grade([])
    assert empty.correct == [] and empty.metrics()["reward/error_rate"] == 0.0


def test_timeout_is_counted_and_the_pool_recovers(pool):
    res = pool.grade([(POWER_TOWER, "1")], timeout=0.05)
    assert res == GradeResult(correct=[False], timeouts=1, errors=0, no_box=0)
    # the killed worker is replaced; the next batch (default 5 s limit) is graded normally
    res = pool.grade([("\\boxed{\\dfrac{3}{4}}", "0.75"), ("\\boxed{2}", "3")] * 4)
    assert res.correct == [True, False] * 4 and res.timeouts == 0 and res.errors == 0


def test_worker_crash_is_an_error_and_the_pool_recovers(pool):
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


def test_memory_bomb_is_capped():
    """2^(2^32) needs 512 MB as an exact integer: with the worker's address space capped it fails fast
    (wrong, bounded) instead of growing until the time limit; the pool keeps working."""
    with GradingPool(num_workers=1, timeout=30, memory_mb=64) as pool:
        t0 = time.monotonic()
        result = pool.grade([("\\boxed{2^{2^{32}}}", "1"), ("\\boxed{2}", "2")])
        assert result.correct == [False, True]
        assert result.timeouts == 0 and time.monotonic() - t0 < 25
