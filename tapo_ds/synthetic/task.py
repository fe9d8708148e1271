"""The synthetic task: multi-step integer arithmetic, applied left to right.

A problem names a start value and a chain of operations, in a character-cheap phrasing a
tiny character-level model can read::

    From 7: +5, *3, -4.

Its gold solution is one numbered step per line, each showing its computation, then the
boxed answer::

    Step 1: 7+5=12
    Step 2: 12*3=36
    Step 3: 36-4=32
    Final Answer: \\boxed{32}

Difficulty knobs: the number of steps, the operand digits (an operand of ``d`` digits is
drawn from ``10**(d-1) .. 10**d - 1``, so one digit means 1..9: never 0, which would make
``*0`` collapse the chain and ``+0`` a no-op), the operator set (``+ - * /``; division is
always exact) and a bound on every intermediate value (``max_value``; by default no
intermediate goes negative either).

Splits. Whether a problem belongs to the held-out test split is a function of its text
alone (a SHA-256 bucket, :func:`split_of`), so train and test are disjoint for every seed,
every size and every difficulty setting, and a larger train set never eats into the test
set. Within a split problems are unique. Everything is deterministic from the seed
(``random.Random`` seeded with a string, which Python hashes with SHA-512, independently
of ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

OPERATORS = "+-*/"
# The user message of the synthetic task: the problem alone. Set data.prompt_template to
# the same string so that RL prompts match the cold-start data exactly.
PROMPT_TEMPLATE = "{problem}"
FINAL_PREFIX = "Final Answer: \\boxed{"
# Construction prompts for the synthetic task (docs/method.md §Construction prompt: one place, one per mode):
# the built-in templates of tapo_ds.trajectory are ~2,000 characters, which a character-level
# model of ~1M parameters cannot afford; these say the same in one line. `make-data` writes
# them next to the data so that the RL config can point its construction template at them.
SYNTHETIC_CONSTRUCTION_TEMPLATE = (
    "Find the first wrong step and fix it.\n"
    "Problem: {question}\nWrong:\n{wrong}\nRight:\n{right}")
SYNTHETIC_FULL_TEMPLATE = (
    "Find the first wrong step and solve anew.\n"
    "Problem: {question}\nWrong:\n{wrong}\nRight:\n{right}")
SYNTHETIC_TEMPLATES = {"micro": SYNTHETIC_CONSTRUCTION_TEMPLATE, "full": SYNTHETIC_FULL_TEMPLATE}
# 1 problem in TEST_BUCKETS (by the hash of its text) is a test problem.
TEST_BUCKETS = 10
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Step:
    """One written step ``a op b = result`` (``index`` is 1-based)."""

    index: int
    a: int
    op: str
    b: int
    result: int

    @property
    def text(self) -> str:
        return f"Step {self.index}: {self.a}{self.op}{self.b}={self.result}"

    @property
    def computation(self) -> str:
        return f"{self.a}{self.op}{self.b}={self.result}"


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        return f"From {self.start}: " + ", ".join(f"{op}{b}" for op, b in self.ops) + "."

    def steps(self) -> list[Step]:
        out, value = [], self.start
        for i, (op, b) in enumerate(self.ops, 1):
            result = apply(value, op, b)
            if result is None:
                raise ValueError(f"{self.text}: step {i} ({value}{op}{b}) is not an exact integer operation")
            out.append(Step(i, value, op, b, result))
            value = result
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1].result if self.ops else self.start

    @property
    def solution(self) -> str:
        return format_solution(self.steps(), self.answer)


def apply(a: int, op: str, b: int) -> int | None:
    """``a op b``, or None when it is not an exact integer operation (inexact or by zero)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            return None
        return a // b
    raise ValueError(f"unknown operator {op!r}")


def format_final(answer: int) -> str:
    return f"{FINAL_PREFIX}{answer}}}"


def format_solution(steps: Sequence[Step], answer: int) -> str:
    return "\n".join([s.text for s in steps] + [format_final(answer)])


def render_prompt(problem: str, template: str = PROMPT_TEMPLATE) -> str:
    """The user-message content for ``problem`` (the chat template is applied later)."""
    return template.replace("{problem}", problem)


# --------------------------------------------------------------------------- parsing

_PROBLEM_RE = re.compile(r"From\s+(-?\d+)\s*:\s*((?:[+\-*/]\s*\d+\s*,\s*)*[+\-*/]\s*\d+)\s*\.")
_OP_RE = re.compile(r"([+\-*/])\s*(\d+)")
STEP_RE = re.compile(r"^\s*Step\s*(\d+)\s*:\s*(-?\d+)\s*([+\-*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
FINAL_RE = re.compile(r"^\s*Final Answer:\s*(.*?)\s*$")


def parse_problem(text: str) -> Problem | None:
    """The problem inside ``text`` (which may be a whole rendered prompt), or None.

    The first ``From N: ...`` phrase is used; a problem whose chain is not exact integer
    arithmetic (a division with a remainder) is rejected.
    """
    if not isinstance(text, str):
        return None
    m = _PROBLEM_RE.search(text)
    if m is None:
        return None
    try:
        ops = tuple((op, int(b)) for op, b in _OP_RE.findall(m.group(2)))
        problem = Problem(int(m.group(1)), ops)
        problem.steps()
    except ValueError:
        return None
    return problem


def parse_step(line: str) -> Step | None:
    m = STEP_RE.match(line)
    if m is None:
        return None
    idx, a, op, b, r = m.groups()
    try:
        return Step(int(idx), int(a), op, int(b), int(r))
    except ValueError:  # a number past Python's int-from-string digit limit: garbage
        return None


# --------------------------------------------------------------------------- generation


def _as_range(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        lo = hi = value
    else:
        values = list(value)
        if len(values) == 1:
            lo = hi = int(values[0])
        elif len(values) == 2:
            lo, hi = int(values[0]), int(values[1])
        else:
            raise ValueError(f"{name}: expected an int or (lo, hi), got {value!r}")
    if lo < 1 or hi < lo:
        raise ValueError(f"{name}: need 1 <= lo <= hi, got ({lo}, {hi})")
    return lo, hi


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(10 ** (d - 1), 10 ** d - 1)


def default_max_value(digits: int | Sequence[int]) -> int:
    """999 for one-digit operands, 99 999 for two, ...: room for a product or two."""
    return 10 ** (2 * _as_range(digits, "digits")[1] + 1) - 1


def sample_problem(rng: random.Random, steps: int | Sequence[int] = (2, 4),
                   digits: int | Sequence[int] = 1, operators: str = "+-*",
                   max_value: int | None = None, allow_negative: bool = False) -> Problem:
    """One random problem; every intermediate lies in [0 or -max_value, max_value]."""
    steps_r, digits_r = _as_range(steps, "steps"), _as_range(digits, "digits")
    ops_set = "".join(dict.fromkeys(operators))
    if not ops_set or any(op not in OPERATORS for op in ops_set):
        raise ValueError(f"operators: expected a non-empty subset of {OPERATORS!r}, got {operators!r}")
    bound = default_max_value(digits_r) if max_value is None else int(max_value)
    lo_bound = -bound if allow_negative else 0
    lo_digit, hi_digit = 10 ** (digits_r[0] - 1), 10 ** digits_r[1] - 1
    for _ in range(1000):
        n = rng.randint(*steps_r)
        value = _operand(rng, digits_r)
        if value > bound:
            continue
        start, ops = value, []
        while len(ops) < n:
            chosen = None
            for op in rng.sample(ops_set, len(ops_set)):
                if op == "/":
                    divisors = [b for b in range(max(2, lo_digit), hi_digit + 1)
                                if value % b == 0 and value != 0]
                    if not divisors:
                        continue
                    b = rng.choice(divisors)
                else:
                    b = _operand(rng, digits_r)
                    if op == "*" and b == 1 and hi_digit > 1:
                        b = rng.randint(2, hi_digit)  # *1 is a no-op (and /1 is never drawn)
                result = apply(value, op, b)
                if result is not None and lo_bound <= result <= bound:
                    chosen = (op, b, result)
                    break
            if chosen is None:
                break
            ops.append(chosen[:2])
            value = chosen[2]
        if len(ops) == n:
            return Problem(start, tuple(ops))
    raise ValueError(f"could not draw a problem with steps={steps}, digits={digits}, "
                     f"operators={operators!r}, max_value={bound}")


def split_of(problem_text: str, test_buckets: int = TEST_BUCKETS) -> str:
    """``"test"`` for one problem text in ``test_buckets``, else ``"train"`` (a fixed hash)."""
    h = int.from_bytes(hashlib.sha256(problem_text.encode("utf-8")).digest()[:8], "big")
    return "test" if h % test_buckets == 0 else "train"


def generate_problems(n: int, seed: int | str, *, split: str | None = "train",
                      steps: int | Sequence[int] = (2, 4), digits: int | Sequence[int] = 1,
                      operators: str = "+-*", max_value: int | None = None,
                      allow_negative: bool = False, exclude: Iterable[str] = (),
                      stream: str = "problems") -> list[Problem]:
    """``n`` distinct problems of ``split`` (``None``: either split), deterministic from ``seed``.

    ``stream`` names an independent random stream for the same seed (the cold-start mix
    uses its own, so that it does not simply repeat the RL training problems).
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS} or None, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"tapo-ds-synthetic/{stream}/{seed}/{split}")
    seen = set(exclude)
    out: list[Problem] = []
    budget = 200 * n + 10_000
    while len(out) < n:
        if budget == 0:
            raise ValueError(
                f"only {len(out)} distinct {split or 'any'}-split problems found out of {n} requested "
                f"(steps={steps}, digits={digits}, operators={operators!r}): the space is too small")
        budget -= 1
        p = sample_problem(rng, steps, digits, operators, max_value, allow_negative)
        text = p.text
        if text in seen or (split is not None and split_of(text) != split):
            continue
        seen.add(text)
        out.append(p)
    return out


def problem_record(problem: Problem, id: str) -> dict:
    return {"id": id, "problem": problem.text, "answer": str(problem.answer),
            "solution": problem.solution}


def generate_dataset(n: int, seed: int | str = 0, steps: int | Sequence[int] = (2, 4),
                     digits: int | Sequence[int] = 1, operators: str = "+-*", *,
                     split: str | None = "train", max_value: int | None = None,
                     allow_negative: bool = False, exclude: Iterable[str] = ()) -> list[dict]:
    """``n`` records ``{id, problem, answer, solution}`` of ``split``, deterministic from ``seed``
    (and from ``exclude``, problem texts to leave out)."""
    problems = generate_problems(n, seed, split=split, steps=steps, digits=digits,
                                 operators=operators, max_value=max_value,
                                 allow_negative=allow_negative, exclude=exclude)
    prefix = split or "any"
    return [problem_record(p, f"{prefix}-{i:05d}") for i, p in enumerate(problems)]
