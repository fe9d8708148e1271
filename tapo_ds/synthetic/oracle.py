"""The synthetic oracle constructor (``tapo.constructor: synthetic_oracle``): TAPO with the synthetic
task's rule constructor in place of the policy, its correction spoiled on purpose with probability
``1 - p`` (``tapo.oracle_accuracy``).

It separates TAPO's mechanism from the model's ability to construct: the analysis, the prefix and
the reflection point are always right (the rule constructor finds the first wrong step and keeps the
wrong text verbatim up to it), only whether the correction reaches the right answer varies, and p
sets how often it does.

Spoiling is one arithmetic slip after the reflection mark, as a model would make it (off by one or a
wrong digit, :func:`tapo_ds.synthetic.errors.corrupt`): in the reflection's own redo of the wrong step
or in one of the steps after it, uniformly over those computations, each later step continuing
correctly from the slipped value, so the boxed answer is wrong. In ``full`` mode one step of the
fresh solution slips. Where nothing is computed after the mark (a step past the problem's last) the
final answer line itself is off by one.

The draws are seeded by (seed, rank, step, request index), so an arm is reproducible and a request
is spoiled or not whatever the other requests of the step are.

A pair the rule constructor cannot read (no step line before the first stray line, or a wrong
answer that is right by the rules, e.g. a right answer without a box) gets an empty output: the
parser drops it and counts it as unparsable, as it does a model's unreadable output.
"""

from __future__ import annotations

import random

from ..trajectory.backends import Backend, BackendContext, ConstructionJob, register_backend
from ..trajectory.parsing import format_construction
from .constructor import Diagnosis, analysis_text, diagnose, reconstruction_text
from .errors import CorruptionError, corrupt
from .task import Problem, Step, format_final, format_solution, parse_problem


def _reindexed(steps: list[Step], first: int) -> list[Step]:
    return [Step(first + i, s.a, s.op, s.b, s.result) for i, s in enumerate(steps)]


def _slipped(steps: list[Step], rng: random.Random) -> list[Step] | None:
    """``steps`` (a correct chain) with one arithmetic slip carried to the end; None if none applies."""
    if not steps:
        return None
    try:
        wrong = corrupt(_reindexed(steps, 1), rng, "arithmetic")
    except CorruptionError:
        return None
    return _reindexed(list(wrong.steps), steps[0].index)


def _slipped_answer(answer: int, rng: random.Random) -> int:
    return answer + rng.choice((-1, 1))


def _spoiled_micro(problem: Problem, diagnosis: Diagnosis, rng: random.Random) -> str:
    gold = problem.steps()
    redone = gold[diagnosis.resume - 1] if diagnosis.resume >= 1 else None
    # The reflection redoes the wrong step (its computation is in the line) except for an extra step.
    redo = redone is not None and redone.computation in diagnosis.reflection
    after = gold[diagnosis.resume - 1:] if redo else gold[diagnosis.resume:]
    written = _slipped(after, rng)
    lines = [diagnosis.prefix.rstrip()]
    if written is None:
        lines.append(diagnosis.reflection)
        lines += [s.text for s in after]
        lines.append(format_final(_slipped_answer(problem.answer, rng)))
        return "\n".join(lines)
    if redo:
        lines.append(diagnosis.reflection.replace(redone.computation, written[0].computation, 1))
        written_after = written[1:]
    else:
        lines.append(diagnosis.reflection)
        written_after = written
    lines += [s.text for s in written_after]
    lines.append(format_final(written[-1].result))
    return "\n".join(lines)


def _spoiled_full(problem: Problem, rng: random.Random) -> str:
    gold = problem.steps()
    written = _slipped(gold, rng)
    if written is None:
        return format_solution(gold, _slipped_answer(problem.answer, rng))
    return format_solution(written, written[-1].result)


def spoiled_reconstruction(problem: Problem, diagnosis: Diagnosis, mode: str, rng: random.Random) -> str:
    """The reconstruction of ``diagnosis`` with one slip after the reflection mark (``micro``), or in the
    fresh solution (``full``): the boxed answer is wrong."""
    return _spoiled_full(problem, rng) if mode == "full" else _spoiled_micro(problem, diagnosis, rng)


def oracle_construction(question: str, wrong: str, *, mode: str, spoil: bool, rng: random.Random) -> str:
    """The rule construction for (question, wrong), its correction slipped when ``spoil``; "" when the
    rules cannot read the pair."""
    diagnosis = diagnose(question, wrong)
    if diagnosis is None:
        return ""
    problem = parse_problem(question)
    if spoil:
        reconstruction = spoiled_reconstruction(problem, diagnosis, mode, rng)
    else:
        reconstruction = reconstruction_text(problem, diagnosis, mode)
    return format_construction(analysis_text(diagnosis), reconstruction)


def request_rng(seed: int, rank: int, step: int, index: int) -> random.Random:
    return random.Random(f"synthetic_oracle:{seed}:{rank}:{step}:{index}")


@register_backend("synthetic_oracle")
def synthetic_oracle_backend(context: BackendContext) -> Backend:
    p, mode = context.oracle_accuracy, context.construction

    def backend(job: ConstructionJob) -> list[str]:
        outputs = []
        for i, (question, wrong) in enumerate(zip(job.questions, job.wrong)):
            rng = request_rng(context.seed, job.rank, job.step, i)
            outputs.append(oracle_construction(question, wrong, mode=mode, spoil=rng.random() >= p, rng=rng))
        return outputs

    return backend
