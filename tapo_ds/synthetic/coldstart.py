"""The cold-start data builder's pure core (docs/method.md §Cold start), and the synthetic cold-start mix.

:func:`build_coldstart` takes what a sampling pass produced (questions, their gold
answers, K responses per question and their rewards), pairs wrong and right answers as
TAPO does (:func:`tapo_ds.trajectory.select_pairs`), asks a *constructor* for each pair,
keeps only constructions that parse AND whose reconstruction verifies, and returns the
two kinds of rows the paper trains on:

* SFT-format: ``prompt`` = the question rendered with the task's prompt template (the
  same user-message content the rollout uses), ``response`` = the reconstruction;
* IFT-format: ``prompt`` = the construction prompt
  (:func:`tapo_ds.trajectory.render_construction_prompt`), ``response`` =
  ``<analysis>...</analysis><reconstruction>...</reconstruction>`` (normalised from the
  parsed parts, so an output with chatter around the tags trains on the tags only).

``prompt`` is raw user-message content: the SFT stage applies the chat template.

The constructor is any callable ``(question, wrong, right) -> str | None`` (the
synthetic rule constructor, or a model-based one the trainer provides; None = failed),
the grader any callable ``[(response, gold), ...] -> [bool, ...]`` graded in one batch
(:func:`synthetic_grader`, :func:`math_equal_grader` or :func:`pool_grader`), so this
module needs no model, no engine and no worker pool.

:func:`build_synthetic_mix` makes the cold-start mix that trains a tiny model from
scratch on the synthetic task: gold solutions (to solve), SFT-format micro-reflective
trajectories (to reflect) and IFT-format constructions (to construct), in configurable
proportions, the latter two from :func:`~tapo_ds.synthetic.errors.corrupt` and the rule
constructor, passed through :func:`build_coldstart` so they are verified the same way.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..reward import last_boxed
from ..trajectory import (
    DEFAULT_CONSTRUCTION_TEMPLATE,
    parse_construction,
    prefix_fidelity,
    render_construction_prompt,
    select_pairs,
)
from .constructor import REFLECTION, format_construction, int_or_none, rule_constructor
from .errors import ERROR_KINDS, random_wrong_solution
from .task import (
    PROMPT_TEMPLATE,
    SYNTHETIC_TEMPLATES,
    generate_problems,
    parse_step,
    render_prompt,
    write_jsonl,
)

Constructor = Callable[[str, str, str], "str | None"]
Grader = Callable[[list], list]
ROW_KINDS = ("gold", "sft", "ift")
DEFAULT_MIX = {"gold": 0.5, "sft": 0.3, "ift": 0.2}


# --------------------------------------------------------------------------- graders


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


def math_equal_grader(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """``tapo_ds.reward.math_equal`` one answer at a time (its default pool)."""
    from ..reward import math_equal

    return [math_equal(response, gold) for response, gold in pairs]


def pool_grader(pool, timeout: float | None = None) -> Grader:
    """A grader over a :class:`tapo_ds.reward.GradingPool`: one ``grade`` call per batch."""
    def grade(pairs):
        return list(pool.grade(list(pairs), timeout=timeout).correct)
    return grade


# --------------------------------------------------------------------------- the builder


@dataclass
class ColdStartStats:
    questions: int = 0
    responses: int = 0
    candidates: int = 0    # questions DCS selected
    pairs: int = 0
    too_long: int = 0      # pairs over the construction prompt budget (skipped)
    constructed: int = 0   # the constructor returned text
    parsed: int = 0        # ... that parses
    verified: int = 0      # ... whose reconstruction verifies
    low_fidelity: int = 0  # verified, dropped by min_fidelity
    fidelity_sum: float = 0.0  # prefix fidelity over verified constructions
    duplicates: int = 0    # verified rows identical to an earlier one (dropped)
    kept_sft: int = 0
    kept_ift: int = 0      # an IFT row also needs a non-empty analysis

    def as_dict(self) -> dict:
        out = asdict(self)
        out["mean_fidelity"] = self.fidelity_sum / self.verified if self.verified else None
        del out["fidelity_sum"]
        return out

    def summary(self) -> str:
        d = self.as_dict()
        fid = d.pop("mean_fidelity")
        return ", ".join(f"{k} {v}" for k, v in d.items()) + (
            f", mean prefix fidelity {fid:.3f}" if fid is not None else "")


@dataclass
class ColdStartResult:
    sft: list[dict]
    ift: list[dict]
    stats: ColdStartStats
    examples: list[dict] = field(default_factory=list)

    def write(self, out_dir: str | Path, sft_name: str = "coldstart_sft.jsonl",
              ift_name: str = "coldstart_ift.jsonl") -> tuple[Path, Path]:
        out = Path(out_dir)
        paths = out / sft_name, out / ift_name
        write_jsonl(self.sft, paths[0])
        write_jsonl(self.ift, paths[1])
        return paths


def format_examples(examples: Sequence[dict], width: int = 400) -> str:
    """The examples of a build, for printing."""
    blocks = []
    for i, ex in enumerate(examples, 1):
        parts = [f"--- example {i}"]
        for key in ("question", "wrong", "construction"):
            text = ex.get(key, "")
            text = text if len(text) <= width else text[:width] + " ..."
            parts.append(f"[{key}]\n{text}")
        blocks.append("\n".join(parts))
    return "\n".join(blocks)


def build_coldstart(
    questions: Sequence[str],
    answers: Sequence[str],
    responses: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]],
    constructor: Constructor,
    grader: Grader,
    *,
    n_pos: int = 1,
    n_neg: int = 1,
    m_max: int = 4,
    seed: int = 0,
    prompt_template: str = PROMPT_TEMPLATE,
    construction_template: str = DEFAULT_CONSTRUCTION_TEMPLATE,
    count_tokens: Callable[[str], int] | None = None,
    max_prompt_tokens: int | None = None,
    min_fidelity: float | None = None,
    dedupe: bool = True,
    n_examples: int = 3,
) -> ColdStartResult:
    """Pair, construct, keep what parses and verifies; see the module docstring.

    ``questions[i]`` is the raw problem text (what ``{problem}`` / ``{question}`` stand
    for), ``answers[i]`` its gold answer, ``responses[i]`` / ``rewards[i]`` its K samples
    (K may differ between questions). Right means reward > 0. Pairs follow
    ``select_pairs(n_pos, n_neg, m_max)`` with ``random.Random(seed)``; the cold start can
    afford looser settings than RL (default 1, 1, 4). ``count_tokens`` +
    ``max_prompt_tokens``: skip (and count) pairs whose construction prompt is over budget.
    ``min_fidelity``: also drop verified constructions whose prefix fidelity is lower
    (useful for a model constructor; the rule constructor is always at 1.0).
    """
    if not (len(questions) == len(answers) == len(responses) == len(rewards)):
        raise ValueError(f"questions, answers, responses and rewards differ in length: {len(questions)}, "
                         f"{len(answers)}, {len(responses)}, {len(rewards)}")
    if "{problem}" not in prompt_template:
        raise ValueError("prompt_template must contain {problem}")
    stats = ColdStartStats(questions=len(questions))
    texts: list[str] = []
    flat_rewards: list[float] = []
    group_index: list[int] = []
    for g, (resp, rew) in enumerate(zip(responses, rewards)):
        if len(resp) != len(rew):
            raise ValueError(f"question {g}: {len(resp)} responses but {len(rew)} rewards")
        texts.extend(resp)
        flat_rewards.extend(float(r) for r in rew)
        group_index.extend([g] * len(resp))
    stats.responses = len(texts)

    sel = select_pairs(flat_rewards, group_index, n_pos=n_pos, n_neg=n_neg, m_max=m_max,
                       rng=random.Random(seed))
    stats.candidates, stats.pairs = sel.n_candidates, len(sel.pairs)

    parsed_items = []  # (pair, construction prompt, raw output, parsed)
    for pair in sel.pairs:
        question, wrong, right = questions[pair.group], texts[pair.neg], texts[pair.pos]
        prompt = render_construction_prompt(question, wrong, right, construction_template)
        if count_tokens is not None and max_prompt_tokens is not None \
                and count_tokens(prompt) > max_prompt_tokens:
            stats.too_long += 1
            continue
        output = constructor(question, wrong, right)
        if not isinstance(output, str):
            continue
        stats.constructed += 1
        parsed = parse_construction(output)
        if parsed is None:
            continue
        stats.parsed += 1
        parsed_items.append((pair, prompt, output, parsed))

    verdicts = grader([(p.reconstruction, answers[pair.group]) for pair, _, _, p in parsed_items]) \
        if parsed_items else []
    if len(verdicts) != len(parsed_items):
        raise ValueError(f"grader returned {len(verdicts)} verdicts for {len(parsed_items)} responses")

    sft, ift, examples = [], [], []
    seen_sft, seen_ift = set(), set()
    for (pair, prompt, output, parsed), ok in zip(parsed_items, verdicts):
        if not ok:
            continue
        stats.verified += 1
        wrong = texts[pair.neg]
        fidelity = prefix_fidelity(parsed.reconstruction, wrong)
        stats.fidelity_sum += fidelity
        if min_fidelity is not None and fidelity < min_fidelity:
            stats.low_fidelity += 1
            continue
        question = questions[pair.group]
        sft_row = {"prompt": render_prompt(question, prompt_template),
                   "response": parsed.reconstruction, "kind": "sft"}
        ift_row = {"prompt": prompt,
                   "response": format_construction(parsed.analysis, parsed.reconstruction),
                   "kind": "ift"} if parsed.analysis else None
        key_sft = (sft_row["prompt"], sft_row["response"])
        dup = dedupe and key_sft in seen_sft
        if dup:
            stats.duplicates += 1
        else:
            seen_sft.add(key_sft)
            sft.append(sft_row)
        if ift_row is not None:
            key_ift = (ift_row["prompt"], ift_row["response"])
            if not (dedupe and key_ift in seen_ift):
                seen_ift.add(key_ift)
                ift.append(ift_row)
        if len(examples) < n_examples and not dup:
            examples.append({"question": question, "wrong": wrong, "right": texts[pair.pos],
                             "construction": output, "analysis": parsed.analysis,
                             "reconstruction": parsed.reconstruction, "prefix_fidelity": fidelity})
    stats.kept_sft, stats.kept_ift = len(sft), len(ift)
    return ColdStartResult(sft=sft, ift=ift, stats=stats, examples=examples)


# --------------------------------------------------------------------------- the synthetic mix


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
    """
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
                            rule_constructor(mode=mode, analysis=analysis), synthetic_grader,
                            n_pos=1, n_neg=1, m_max=1, seed=seed, prompt_template=prompt_template,
                            construction_template=template, n_examples=0)
    # One construction per problem: the first counts["sft"] problems give SFT rows, the rest IFT.
    if built.stats.kept_sft != len(questions) or built.stats.kept_ift != len(questions) \
            or len(questions) < n_con:
        raise RuntimeError(f"synthetic mix: {len(questions)} problems for {n_con} constructions, "
                           f"built {built.stats.summary()}")
    rows += built.sft[:counts["sft"]]
    rows += built.ift[counts["sft"]:n_con]
    random.Random(f"tapo-ds-synthetic/mix/{seed}").shuffle(rows)
    return MixResult(rows=rows, counts=counts, error_kinds=dict(sorted(kinds_of.items())),
                     build=built.stats)
