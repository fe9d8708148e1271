"""Realistic wrong solutions of the synthetic task, for tests and for seeding cold-start data.

:func:`corrupt` takes a correct solution (a :class:`~tapo_ds.synthetic.task.Problem`, its
gold steps, or the gold solution text), puts ONE error at a chosen step and writes the
rest as a model would: every later step continues correctly from the wrong value, in the
same format, down to a (wrong) boxed answer. Error kinds:

``arithmetic``  the step's own computation slips: off by one (``12*3=35``) or one digit
                wrong (``12*3=26``).
``operator``    the step applies another operator to the right operand (``12+3=15``
                where the problem says ``*3``).
``carry``       the step starts from a wrong value instead of the previous result: a
                slip of it or the stale value before it (``Step 2: 13*3=39`` or
                ``Step 2: 7*3=21`` after ``Step 1: 7+5=12``); step 2 or later.
``skip``        the step is left out: the solution jumps to the next operation (renumbered),
                or, at the last step, stops one step early.
``copy``        the step uses another number of the problem as its operand
                (``12*5=60`` where the problem says ``*3`` and ``5`` appears elsewhere in it).

The returned :class:`WrongSolution` names the step (1-based, counted in the problem's
steps) where the first mistake is; the rule constructor must find exactly that step.

Accidental right answers. Every operation of the task is injective in its input
(operands are never 0, division is exact), so once the value after the erroneous step
differs from the gold value, the final answer differs too. The value can still come out
equal, e.g. an operator error on ``2*2`` written as ``2+2``, skipping ``*1``, or copying a
``3`` as ``3``. :func:`corrupt` therefore enumerates every candidate error of the kind,
simulates the written chain, and keeps only candidates whose final answer differs from
the gold one. It also drops candidates that would be ambiguous to a reader (an operator or
copy error that writes exactly the next operation of the problem reads as a skipped step;
skipping one of two equal consecutive operations reads as skipping the second), those
whose chain leaves exact integer arithmetic (a later division with a remainder) and those
whose values blow up (beyond ``max(999, 10 x the largest gold value)``); it prefers
candidates that stay non-negative when the gold chain does. When no candidate is left
(``carry`` on a one-step problem, ``copy`` when every number of the problem is the same)
it raises :class:`CorruptionError`; :func:`random_wrong_solution` then tries other kinds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .task import OPERATORS, Problem, Step, apply, format_solution, parse_problem, parse_step

ERROR_KINDS: tuple[str, ...] = ("arithmetic", "operator", "carry", "skip", "copy")


class CorruptionError(ValueError):
    """No error of the requested kind (at the requested step) gives a wrong final answer."""


@dataclass(frozen=True)
class WrongSolution:
    text: str
    steps: tuple[Step, ...]
    answer: int
    kind: str
    step: int     # 1-based problem step of the first mistake
    detail: str   # e.g. "off_by_one", "wrong_digit", "+ instead of *", "5 instead of 3"


def _digit_slips(value: int) -> list[int]:
    """``value`` with one digit changed (no new leading zero), sign kept."""
    sign, digits = (-1 if value < 0 else 1), str(abs(value))
    out = []
    for i, ch in enumerate(digits):
        for d in "0123456789":
            if d == ch or (i == 0 and d == "0" and len(digits) > 1):
                continue
            out.append(sign * int(digits[:i] + d + digits[i + 1:]))
    return out


def _slips(value: int) -> dict[str, list[int]]:
    return {"off_by_one": [value - 1, value + 1],
            "wrong_digit": [v for v in _digit_slips(value) if abs(v - value) != 1]}


def _as_steps(solution) -> list[Step]:
    if isinstance(solution, Problem):
        return solution.steps()
    if isinstance(solution, str):
        problem = parse_problem(solution)
        if problem is not None:
            return problem.steps()
        steps = [s for s in map(parse_step, solution.splitlines()) if s is not None]
    else:
        steps = list(solution)
    if not steps:
        raise ValueError("corrupt: no steps to corrupt")
    value = steps[0].a
    for i, s in enumerate(steps, 1):
        if s.index != i or s.a != value or apply(s.a, s.op, s.b) != s.result:
            raise ValueError(f"corrupt: expects a correct solution, step {i} is {s.text!r}")
        value = s.result
    return steps


def _continue(written: list[tuple[int, str, int, int]], value: int,
              rest: Sequence[tuple[str, int]]) -> list[tuple[int, str, int, int]] | None:
    """Append ``rest`` applied from ``value``; None when a division is inexact."""
    out = list(written)
    for op, b in rest:
        r = apply(value, op, b)
        if r is None:
            return None
        out.append((value, op, b, r))
        value = r
    return out


def _candidates(steps: list[Step], kind: str, operators: str) -> list[tuple[int, str, list]]:
    """Every ``(step, detail, written chain)`` of ``kind``, before filtering."""
    ops = [(s.op, s.b) for s in steps]
    start = steps[0].a
    numbers = [start] + [b for _, b in ops]
    n = len(steps)
    out = []
    for k in range(1, n + 1):
        gold_before = [(s.a, s.op, s.b, s.result) for s in steps[:k - 1]]
        s = steps[k - 1]
        nxt = ops[k] if k < n else None
        if kind == "arithmetic":
            for detail, values in _slips(s.result).items():
                for r in values:
                    chain = _continue(gold_before + [(s.a, s.op, s.b, r)], r, ops[k:])
                    out.append((k, detail, chain))
        elif kind == "operator":
            for op in operators:
                if op == s.op or (op, s.b) == nxt:
                    continue
                r = apply(s.a, op, s.b)
                if r is None:
                    continue
                chain = _continue(gold_before + [(s.a, op, s.b, r)], r, ops[k:])
                out.append((k, f"{op} instead of {s.op}", chain))
        elif kind == "carry":
            if k == 1:
                continue
            variants = _slips(s.a)
            variants["stale"] = [steps[k - 2].a]  # the value before the previous step
            for detail, values in variants.items():
                for a in values:
                    if a == s.a:
                        continue
                    r = apply(a, s.op, s.b)
                    if r is None:
                        continue
                    chain = _continue(gold_before + [(a, s.op, s.b, r)], r, ops[k:])
                    out.append((k, f"{detail}: {a} instead of {s.a}", chain))
        elif kind == "skip":
            if nxt == (s.op, s.b):
                continue  # skipping the first of two equal operations reads as skipping the second
            chain = _continue(gold_before, s.a, ops[k:])
            out.append((k, f"skipped {s.op}{s.b}", chain))
        elif kind == "copy":
            for b in sorted(set(numbers)):
                if b == s.b or b <= 0 or (s.op, b) == nxt:
                    continue
                r = apply(s.a, s.op, b)
                if r is None:
                    continue
                chain = _continue(gold_before + [(s.a, s.op, b, r)], r, ops[k:])
                out.append((k, f"{b} instead of {s.b}", chain))
        else:
            raise ValueError(f"unknown error kind {kind!r}; expected one of {ERROR_KINDS}")
    return out


def corrupt(solution, rng: random.Random, kind: str, *, at: int | None = None,
            operators: str = OPERATORS) -> WrongSolution:
    """A wrong solution with one ``kind`` error at step ``at`` (random when None).

    ``solution``: a Problem, its correct steps, or a text holding the problem or the gold
    steps. ``operators``: the operators an ``operator`` error may write. Raises
    :class:`CorruptionError` when no such error changes the final answer.
    """
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}; expected one of {ERROR_KINDS}")
    steps = _as_steps(solution)
    gold = steps[-1].result
    gold_values = [steps[0].a] + [s.result for s in steps]
    bound = max(999, 10 * max(abs(v) for v in gold_values))
    nonneg_gold = min(gold_values) >= 0
    valid = []
    for k, detail, chain in _candidates(steps, kind, operators):
        if not chain or (at is not None and k != at):
            continue  # inexact division, or nothing left to write (skipping a one-step solution)
        final = chain[-1][3]
        values = [v for row in chain for v in (row[0], row[3])]
        if final == gold or any(abs(v) > bound for v in values):
            continue
        valid.append((k, detail, chain, min(values, default=0) >= 0))
    if nonneg_gold and any(ok for *_, ok in valid):
        valid = [c for c in valid if c[3]]
    if not valid:
        where = f" at step {at}" if at is not None else ""
        raise CorruptionError(f"no {kind} error{where} changes the answer of {len(steps)}-step "
                              f"solution ending in {gold}")
    # Pick the step first, then the variant, so that steps are uniform whatever their number
    # of variants; details (off_by_one / wrong_digit) likewise.
    k = rng.choice(sorted({c[0] for c in valid}))
    at_k = [c for c in valid if c[0] == k]
    kinds_of_detail = sorted({c[1].split(":")[0] for c in at_k})
    group = rng.choice(kinds_of_detail)
    _, detail, chain, _ = rng.choice([c for c in at_k if c[1].split(":")[0] == group])
    written = tuple(Step(i, a, op, b, r) for i, (a, op, b, r) in enumerate(chain, 1))
    answer = written[-1].result
    return WrongSolution(text=format_solution(written, answer), steps=written, answer=answer,
                         kind=kind, step=k, detail=detail)


def random_wrong_solution(solution, rng: random.Random,
                          kinds: Sequence[str] = ERROR_KINDS,
                          operators: str = OPERATORS) -> WrongSolution:
    """A wrong solution of a random applicable kind among ``kinds``."""
    order = list(kinds)
    rng.shuffle(order)
    for kind in order:
        try:
            return corrupt(solution, rng, kind, operators=operators)
        except CorruptionError:
            continue
    raise CorruptionError(f"none of the error kinds {tuple(kinds)} applies")
