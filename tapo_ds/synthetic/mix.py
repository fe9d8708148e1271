"""The synthetic cold-start mix: the rows that train a tiny model from scratch on the synthetic task.

Gold solutions (to solve), SFT-format micro-reflective trajectories (to reflect) and IFT-format
constructions (to construct), in configurable proportions. The latter two come from
:func:`~tapo_ds.synthetic.errors.corrupt` and the rule constructor, passed through the task-independent
builder (:func:`tapo_ds.coldstart.build_coldstart`), so they are selected, parsed and verified by
TAPO's own code, graded by the task's integer check (:func:`synthetic_grader`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..coldstart import ColdStartStats, build_coldstart, per_pair
from ..reward import last_boxed
from ..trajectory.parsing import format_construction, parse_construction
from .constructor import REFLECTION, diagnose, int_or_none, rule_constructor
from .errors import ERROR_KINDS, random_wrong_solution
from .oracle import spoiled_reconstruction
from .task import PROMPT_TEMPLATE, SYNTHETIC_TEMPLATES, generate_problems, parse_problem, parse_step, render_prompt

ROW_KINDS = ("gold", "sft", "ift")
DEFAULT_MIX = {"gold": 0.5, "sft": 0.3, "ift": 0.2}


def synthetic_grader(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """Integer answers only, in-process: the last box of the response equals the gold integer.

    Agrees with ``math_equal`` on the synthetic task (integers), at no process cost. The gold
    may be the answer or a text ending in a box.
    """
    out = []
    for response, gold in pairs:
        g = int_or_none(last_boxed(gold) if last_boxed(gold) is not None else gold)
        r = int_or_none(last_boxed(response))
        out.append(g is not None and r is not None and r == g)
    return out


def with_check(text: str, right_steps: int, rng: random.Random, rate: float) -> str:
    """``text`` with, at probability ``rate``, a right re-check ("Wait, let me double-check step i: ...")
    inserted after one of its first ``right_steps`` step lines (all of them right); else unchanged."""
    if rate <= 0 or right_steps < 1 or rng.random() >= rate:
        return text
    lines = text.split("\n")
    i = rng.randint(1, right_steps)
    step = parse_step(lines[i - 1])
    if step is None:
        return text
    check = f"{REFLECTION} step {i}: {step.computation}."
    return "\n".join(lines[:i] + [check] + lines[i:])


def mix_counts(n: int, proportions: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` rows by ``proportions`` (largest remainder; ties in ROW_KINDS order)."""
    unknown = set(proportions) - set(ROW_KINDS)
    if unknown:
        raise ValueError(f"mix proportions: unknown kind(s) {sorted(unknown)}; expected {ROW_KINDS}")
    weights = {k: float(proportions.get(k, 0.0)) for k in ROW_KINDS}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"mix proportions must be >= 0 with a positive sum, got {dict(proportions)}")
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    order = sorted(ROW_KINDS, key=lambda k: (-(exact[k] - counts[k]), ROW_KINDS.index(k)))
    for k in order[:n - sum(counts.values())]:
        counts[k] += 1
    return counts


@dataclass
class MixResult:
    rows: list[dict]
    counts: dict[str, int]          # rows per kind
    error_kinds: dict[str, int]     # corruptions per error kind (sft + ift rows)
    build: ColdStartStats
    slipped: int = 0                # IFT rows whose correction slips (slip_rate)


def build_synthetic_mix(
    n: int,
    seed: int = 0,
    *,
    proportions: Mapping[str, float] = DEFAULT_MIX,
    steps: int | Sequence[int] = (2, 4),
    digits: int | Sequence[int] = 1,
    operators: str = "+-*",
    max_value: int | None = None,
    error_kinds: Sequence[str] = ERROR_KINDS,
    mode: str = "micro",
    analysis: str = "brief",
    check_rate: float = 0.0,
    slip_rate: float = 0.0,
    prompt_template: str = PROMPT_TEMPLATE,
    construction_template: str | None = None,
    exclude: Sequence[str] = (),
) -> MixResult:
    """``n`` rows ``{prompt, response, kind}`` of the cold-start mix, shuffled, from ``seed``.

    Problems come from the train split only (never the held-out test split), from their
    own random stream, all distinct, none in ``exclude`` (e.g. the RL training problems,
    to keep the cold start off them). ``check_rate``: the share of wrong and of right answers
    that carry a harmless check of a right step (:func:`with_check`), as a policy trained on
    micro-reflective rows writes them, so that constructions learn to copy such lines.
    ``construction_template``: None = the synthetic
    template of ``mode``. ``mode="full"`` makes the SFT/IFT rows full reconstructions.
    ``slip_rate``: the share of IFT rows whose correction makes one arithmetic slip after the reflection
    (the synthetic oracle's spoiling), so that the boxed answer is wrong: a constructor trained on it
    locates and copies as before but reaches the right answer only about ``1 - slip_rate`` of the time,
    which is what makes reflected groups mixed (TAPO's signal; equal-reward groups carry none).
    """
    if not 0.0 <= slip_rate <= 1.0:
        raise ValueError(f"slip_rate: expected a value in [0, 1], got {slip_rate}")
    counts = mix_counts(n, proportions)
    template = SYNTHETIC_TEMPLATES[mode] if construction_template is None else construction_template
    n_con = counts["sft"] + counts["ift"]
    # A few spare problems in case a problem admits no error of any kind (never seen in practice).
    spare = n_con // 20 + 10 if n_con else 0
    problems = generate_problems(counts["gold"] + n_con + spare, seed, split="train",
                                 steps=steps, digits=digits, operators=operators,
                                 max_value=max_value, exclude=exclude, stream="coldstart")
    gold_problems, con_problems = problems[:counts["gold"]], problems[counts["gold"]:]
    rows = [{"prompt": render_prompt(p.text, prompt_template), "response": p.solution, "kind": "gold"}
            for p in gold_problems]

    rng = random.Random(f"tapo-ds-synthetic/corrupt/{seed}")
    questions, answers, responses, rewards, kinds_of = [], [], [], [], {}
    for p in con_problems:
        if len(questions) == n_con:
            break
        try:
            wrong = random_wrong_solution(p, rng, error_kinds, operators=operators)
        except ValueError:
            continue
        questions.append(p.text)
        answers.append(str(p.answer))
        responses.append([with_check(wrong.text, wrong.step - 1, rng, check_rate),
                          with_check(p.solution, len(p.ops), rng, check_rate)])
        rewards.append([0.0, 1.0])
        kinds_of[wrong.kind] = kinds_of.get(wrong.kind, 0) + 1
    built = build_coldstart(questions, answers, responses, rewards,
                            per_pair(rule_constructor(mode=mode, analysis=analysis)), synthetic_grader,
                            n_pos=1, n_neg=1, m_max=1, seed=seed, prompt_template=prompt_template,
                            construction_template=template, n_examples=0)
    # One construction per problem: the first counts["sft"] problems give SFT rows, the rest IFT.
    if built.stats.kept_sft != len(questions) or built.stats.kept_ift != len(questions) \
            or len(questions) < n_con:
        raise RuntimeError(f"synthetic mix: {len(questions)} problems for {n_con} constructions, "
                           f"built {built.stats.summary()}")
    rows += built.sft[:counts["sft"]]
    ift = built.ift[counts["sft"]:n_con]
    slipped = 0
    if slip_rate > 0:
        slip_rng = random.Random(f"tapo-ds-synthetic/slip/{seed}")
        for i, row in enumerate(ift):
            if slip_rng.random() < slip_rate:
                question, wrong = questions[counts["sft"] + i], responses[counts["sft"] + i][0]
                ift[i] = dict(row, response=slipped_response(row, question, wrong, mode, slip_rng))
                slipped += 1
    rows += ift
    random.Random(f"tapo-ds-synthetic/mix/{seed}").shuffle(rows)
    return MixResult(rows=rows, counts=counts, error_kinds=dict(sorted(kinds_of.items())),
                     build=built.stats, slipped=slipped)


def slipped_response(row: dict, question: str, wrong: str, mode: str, rng: random.Random) -> str:
    """``row``'s construction (its analysis kept) with a correction that slips once after the reflection."""
    parsed = parse_construction(row["response"])
    diagnosis = diagnose(question, wrong)
    if parsed is None or diagnosis is None or question not in row["prompt"]:
        raise RuntimeError(f"synthetic mix: IFT row does not match its problem {question!r}")
    return format_construction(parsed.analysis, spoiled_reconstruction(parse_problem(question), diagnosis,
                                                                      mode, rng))
