"""The rule-based constructor of the synthetic task: TAPO's construction step without a model.

Given the problem and a wrong solution text, :func:`diagnose` recomputes every step from
the problem and finds the first mistake; :func:`construct` writes the construction in
TAPO's output format (docs/method.md §Construction prompt)::

    <analysis>Step 2 is wrong: 12*3 is 36, not 35 (arithmetic error).</analysis><reconstruction>Step 1: 7+5=12
    Step 2: 12*3=35
    Wait, let me double-check step 2: 12*3=36.
    Step 3: 36-4=32
    Final Answer: \\boxed{32}</reconstruction>

``mode="micro"`` (the paper's construction) keeps the wrong text verbatim up to and
including the wrong step, adds the reflection, which redoes that step, and continues
with the correct steps; ``mode="full"`` (the "full reconstruction" ablation) keeps the same
analysis and writes the correct solution from scratch.

Reading the wrong text (it may come from a model: truncated, with stray lines):

* blank lines are skipped; lines are matched against ``Step k: a op b = r`` (the written
  step number is not checked, only the computation) and ``Final Answer: ...``;
* the first step line that differs from the problem's step is the mistake: a wrong
  starting value (``copy`` at step 1, ``carry`` later), a wrong result for the right
  operation (``arithmetic``), the next operation of the problem (``skip``), another
  operator on the right operand (``operator``), another operand with the right operator
  (``copy``), anything else (``misread``); a step past the problem's last (``extra``);
* a ``Final Answer`` line before all steps are written is a skipped step (``skip``, named
  after the first missing step); after all of them, a wrong box is ``final`` (its step is
  ``len(steps) + 1``); a right box means the solution is right: nothing to construct;
* the writer's own reflection lines, ``Wait, let me double-check step k: a op b = r.`` (what
  a policy trained on micro-reflective data writes), are read as computations too: right
  after a wrong step line, a check that redoes that step right corrects it (the wrong step
  was not the critical mistake, reading goes on from the corrected value); a check that
  repeats the last correct step right, or writes the next step right, is harmless; any
  other check is itself the first mistake (the prefix then ends with it);
* any other line, or the end of the text, stops the reading: if every step so far was
  right, the rest is missing (``incomplete``, or ``final`` when only the answer line is);
  the stray line is not kept.

The prefix kept is the wrong text itself, cut at the end of the wrong step's line (for a
missing step, at the end of the last correct step), so the prefix fidelity
(:func:`tapo_ds.trajectory.prefix_fidelity`) is 1.0 by construction; the wrong text's
conclusion (its ``Final Answer`` line) is dropped, as in the paper's example.

None (nothing to construct) when the problem cannot be read, when no step line can be
read before the first stray line, or when the solution is right. Never raises on text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

from ..reward import last_boxed
from ..trajectory.parsing import format_construction
from .task import FINAL_RE, Problem, Step, format_final, format_solution, parse_problem, parse_step

REFLECTION = "Wait, let me double-check"
CHECK_RE = re.compile(r"^\s*Wait, let me double-check(?:\s+step\s*(\d+))?\s*:\s*(-?\d+)\s*([+\-*/])\s*(-?\d+)"
                      r"\s*=\s*(-?\d+)\s*\.?\s*$")
MODES = ("micro", "full")
ANALYSIS_STYLES = ("brief", "checked", "diff", "copied", "parted")


@dataclass(frozen=True)
class Diagnosis:
    step: int         # 1-based problem step of the first mistake; len(steps) + 1: the conclusion
    kind: str         # arithmetic operator carry skip copy misread extra final incomplete
    message: str      # the one-line diagnosis
    prefix: str       # the wrong text kept verbatim (up to and including the mistake)
    reflection: str   # "Wait, let me double-check ..." line, redoing the wrong step
    resume: int       # gold steps [resume:] follow the reflection


def int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _check(k: int, gold: Step) -> str:
    return f"{REFLECTION} step {k}: {gold.computation}."


def _step_error(k: int, w: Step, g: Step, nxt: tuple[str, int] | None) -> tuple[str, str]:
    """(kind, message) of a written step ``w`` that differs from the gold step ``g``."""
    if w.a != g.a:
        if k == 1:
            return "copy", f"Step 1 is wrong: the problem starts from {g.a}, not {w.a} (wrong number copied)."
        return "carry", f"Step {k} is wrong: step {k - 1} gave {g.a}, not {w.a} (wrong value carried)."
    if (w.op, w.b) == (g.op, g.b):
        return "arithmetic", f"Step {k} is wrong: {g.a}{g.op}{g.b} is {g.result}, not {w.result} (arithmetic error)."
    if nxt is not None and (w.op, w.b) == nxt:
        return "skip", f"Step {k} is wrong: it skips {g.op}{g.b} (skipped step)."
    said = f"the problem says {g.op}{g.b}, not {w.op}{w.b}"
    if w.b == g.b:
        return "operator", f"Step {k} is wrong: {said} (wrong operator)."
    if w.op == g.op:
        return "copy", f"Step {k} is wrong: {said} (wrong number copied)."
    return "misread", f"Step {k} is wrong: {said} (misread step)."


def parse_check(line: str) -> Step | None:
    """The computation of a reflection line ``Wait, let me double-check step k: a op b = r.``, or None."""
    m = CHECK_RE.match(line)
    if m is None:
        return None
    idx, a, op, b, r = m.groups()
    try:
        return Step(int(idx) if idx else 0, int(a), op, int(b), int(r))
    except ValueError:  # a number past Python's int-from-string digit limit: garbage
        return None


def _same(w: Step, g: Step) -> bool:
    return (w.a, w.op, w.b, w.result) == (g.a, g.op, g.b, g.result)


def _wrong_at(k: int, written: Step, gold: list, prefix: str) -> Diagnosis:
    nxt = (gold[k].op, gold[k].b) if k < len(gold) else None
    kind, message = _step_error(k, written, gold[k - 1], nxt)
    return Diagnosis(k, kind, message, prefix, _check(k, gold[k - 1]), k)


def diagnose(question: str, wrong: str) -> Diagnosis | None:
    """The first mistake of ``wrong`` for the problem in ``question``; None: nothing to construct."""
    if not isinstance(question, str) or not isinstance(wrong, str):
        return None
    problem = parse_problem(question)
    if problem is None or not problem.ops:
        return None
    gold = problem.steps()
    n = len(gold)
    done, last_end, pos = 0, 0, 0  # correct steps read; end of the last one's line
    pending = None  # (k, written step, end of its line): a wrong step a check may still correct
    for line in wrong.splitlines(keepends=True):
        start, pos = pos, pos + len(line)
        body = line.rstrip("\r\n")
        if not body.strip():
            continue
        end = start + len(body)
        written, check = parse_step(body), parse_check(body)
        if pending is not None:
            k, w, w_end = pending
            if check is not None and _same(check, gold[k - 1]):
                done, last_end, pending = k, end, None  # corrected by the writer's own check
                continue
            return _wrong_at(k, w, gold, wrong[:w_end])
        if written is not None:
            k = done + 1
            if k > n:
                return Diagnosis(k, "extra", f"Step {k} is wrong: the problem has only {n} steps (extra step).",
                                 wrong[:end], f"{REFLECTION}: there is no step {k}.", n)
            if _same(written, gold[k - 1]):
                done, last_end = k, end
            else:
                pending = (k, written, end)
            continue
        if check is not None:
            if done and _same(check, gold[done - 1]):
                last_end = end  # re-checks the last step, right
                continue
            if done < n and _same(check, gold[done]):
                done, last_end = done + 1, end  # writes the next step as a check, right
                continue
            k = check.index if check.index in (done, done + 1) and 1 <= check.index <= n else min(done + 1, n)
            return _wrong_at(k, check, gold, wrong[:end])
        final = FINAL_RE.match(body)
        if final is None:
            break  # a stray line: stop reading
        if done == 0:
            return None
        if done < n:
            k = done + 1
            g = gold[k - 1]
            return Diagnosis(k, "skip", f"Step {k} is missing: the solution stops before {g.op}{g.b} (skipped step).",
                             wrong[:last_end], _check(k, g), k)
        boxed = last_boxed(final.group(1))
        value = int_or_none(final.group(1) if boxed is None else boxed)
        if value == problem.answer:
            return None  # the solution is right
        shown = "no number" if value is None else str(value)
        return Diagnosis(n + 1, "final",
                         f"The final answer is wrong: step {n} gives {problem.answer}, not {shown}.",
                         wrong[:last_end], _check(n, gold[-1]), n)
    if pending is not None:
        k, w, w_end = pending
        return _wrong_at(k, w, gold, wrong[:w_end])
    # The end of the text or a stray line, with every step read so far right.
    if done == 0:
        return None
    if done < n:
        k = done + 1
        return Diagnosis(k, "incomplete", f"Step {k} is missing: the solution breaks off after step {done} (incomplete).",
                         wrong[:last_end], _check(k, gold[k - 1]), k)
    return Diagnosis(n + 1, "final", f"The final answer is missing: step {n} gives {problem.answer}.",
                     wrong[:last_end], _check(n, gold[-1]), n)


def analysis_text(diagnosis: Diagnosis, style: str = "brief", problem: Problem | None = None,
                  wrong: str | None = None, right: str | None = None) -> str:
    """``brief``: the diagnosis; ``checked``: "Step 1 ok. Step 2 ok. " before it; ``diff``: each step's result
    in the wrong text beside the right one, up to the first that differs ("1: 28 vs 28 same. 2: 30 vs 20
    differs."), then the diagnosis: locating the mistake by comparing two numbers, not by re-computing
    the step (needs ``problem``); ``copied``: the wrong text's lines up to the mistake, each followed by "ok.",
    the wrong step's own line followed by its diagnosis ("Step 1: 9+8=17 ok. Step 2: 17*7=118 is wrong: ..."):
    the verdict on a line comes right after the model has re-typed it, where the copy of the wrong line and
    the right text's line of the same step first part, instead of a step number chosen before anything is
    compared; ``parted``: the text the wrong and the right solution share from their start, "^" where they
    part, then the diagnosis (needs ``wrong``, and ``right`` or ``problem`` for the gold solution): a model
    that copies both answers at once sees them part as its two copies disagree on the next character."""
    if style == "brief":
        return diagnosis.message
    if style == "checked":
        ok = " ".join(f"Step {i} ok." for i in range(1, diagnosis.step))
        return f"{ok} {diagnosis.message}" if ok else diagnosis.message
    if style == "diff":
        if problem is None:
            raise ValueError("the diff analysis needs the problem")
        return f"{_diff(diagnosis, problem.steps())} {diagnosis.message}"
    if style == "copied":
        return _copied(diagnosis)
    if style == "parted":
        if wrong is None or (right is None and problem is None):
            raise ValueError("the parted analysis needs the wrong text and the right one (or the problem)")
        right = format_solution(problem.steps(), problem.answer) if right is None else right
        return f"{os.path.commonprefix([wrong.strip(), right.strip()])}^\n{diagnosis.message}"
    raise ValueError(f"analysis style: expected one of {ANALYSIS_STYLES}, got {style!r}")


def _copied(d: Diagnosis) -> str:
    lines = [line.strip() for line in d.prefix.splitlines() if line.strip()]
    head = f"Step {d.step} is wrong"
    verdict = d.message
    if lines and d.message.startswith(head):
        verdict = lines.pop() + d.message[len(f"Step {d.step}"):]  # the wrong line itself, then its diagnosis
    # a line that the writer's own check right after it corrects gets no verdict: the check carries it
    marks = ["" if CHECK_RE.match(nxt) else " ok." for nxt in lines[1:]] + [" ok."]
    return " ".join([line + mark for line, mark in zip(lines, marks)] + [verdict])


def _diff(d: Diagnosis, gold: list[Step]) -> str:
    parts = [f"{i}: {g.result} vs {g.result} same." for i, g in enumerate(gold[:d.step - 1], 1)]
    if d.kind == "final":
        return " ".join(parts + ["answer: differs."])
    right = str(gold[d.step - 1].result) if d.step <= len(gold) else "nothing"
    # what the wrong text wrote at the mistake: its prefix's last step (or check) line, unless that line
    # is the step before (the step itself is missing)
    last = next((line for line in reversed(d.prefix.splitlines()) if line.strip()), "")
    step = parse_step(last) or parse_check(last)
    previous = gold[d.step - 2].computation if d.step > 1 else None
    written = str(step.result) if step is not None and step.computation != previous else "nothing"
    return " ".join(parts + [f"{d.step}: {written} vs {right} differs."])


def reconstruction_text(problem: Problem, diagnosis: Diagnosis, mode: str = "micro") -> str:
    gold = problem.steps()
    if mode == "full":
        return format_solution(gold, problem.answer)
    if mode != "micro":
        raise ValueError(f"construction mode: expected one of {MODES}, got {mode!r}")
    lines = [diagnosis.prefix.rstrip(), diagnosis.reflection]
    lines += [s.text for s in gold[diagnosis.resume:]]
    lines.append(format_final(problem.answer))
    return "\n".join(lines)


def construct(question: str, wrong: str, right: str | None = None, *, mode: str = "micro",
              analysis: str = "brief") -> str | None:
    """The construction for (question, wrong), or None. Only the ``parted`` analysis reads ``right`` (None:
    the gold solution); everything else follows from the problem's steps."""
    if mode not in MODES:
        raise ValueError(f"construction mode: expected one of {MODES}, got {mode!r}")
    if analysis not in ANALYSIS_STYLES:
        raise ValueError(f"analysis style: expected one of {ANALYSIS_STYLES}, got {analysis!r}")
    diagnosis = diagnose(question, wrong)
    if diagnosis is None:
        return None
    problem = parse_problem(question)
    return format_construction(analysis_text(diagnosis, analysis, problem, wrong, right),
                               reconstruction_text(problem, diagnosis, mode))


def rule_constructor(mode: str = "micro", analysis: str = "brief") -> Callable[[str, str, str], str | None]:
    """A constructor callable ``(question, wrong, right) -> str | None`` for the cold-start builder."""
    if mode not in MODES:
        raise ValueError(f"construction mode: expected one of {MODES}, got {mode!r}")
    if analysis not in ANALYSIS_STYLES:
        raise ValueError(f"analysis style: expected one of {ANALYSIS_STYLES}, got {analysis!r}")

    def constructor(question: str, wrong: str, right: str) -> str | None:
        return construct(question, wrong, right, mode=mode, analysis=analysis)

    return constructor
