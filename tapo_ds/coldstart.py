"""The cold-start data builder (docs/method.md §Cold start), for any task.

:func:`build_coldstart` takes what a sampling pass produced (questions, their gold answers, K
responses per question and their rewards) and runs TAPO's own construction code on it: pairs from
DCS (:func:`tapo_ds.trajectory.select_pairs`), construction prompts and their budget
(``build_requests``), one call of a *constructor* for all of them, ``parse_outputs``, one batch of
the grader, ``assemble`` with failed constructions dropped. It returns the two kinds of rows the
paper trains on:

* SFT-format: ``prompt`` = the question rendered with the task's prompt template (the same
  user-message content the rollout uses), ``response`` = the reconstruction;
* IFT-format: ``prompt`` = the construction prompt, ``response`` =
  ``<analysis>...</analysis><reconstruction>...</reconstruction>`` (normalised from the parsed
  parts, so an output with chatter around the tags trains on the tags only).

``prompt`` is raw user-message content: the SFT stage applies the chat template.

A constructor maps the step's :class:`Request` list to one output per request (None: nothing
written): a model (:func:`model_constructor`) or rules of a task (:func:`per_pair`, e.g. the
synthetic task's). The grader maps ``[(response, gold), ...]`` to verdicts in one batch
(:func:`pool_grader` or a task's own). Neither needs an engine here.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tapo_ds.data import write_jsonl
from tapo_ds.trajectory import (
    DEFAULT_CONSTRUCTION_TEMPLATE,
    assemble,
    build_requests,
    format_construction,
    parse_outputs,
    select_pairs,
)


@dataclass(frozen=True)
class Request:
    prompt: str  # the rendered construction prompt (user-message content)
    question: str
    wrong: str
    right: str


Constructor = Callable[[list[Request]], "list[str | None]"]
Grader = Callable[[list], list]


def per_pair(fn: Callable[[str, str, str], "str | None"]) -> Constructor:
    """A constructor that writes each pair on its own with ``fn(question, wrong, right)``."""
    return lambda requests: [fn(r.question, r.wrong, r.right) for r in requests]


def model_constructor(*, rollout, tokenizer, sampling, chat_template_kwargs: dict, device=None,
                      batch: int = 64) -> Constructor:
    """A model constructs from the prompts in batches of ``batch``; a pair asked twice is generated once."""
    from tapo_ds.generation import chat_texts

    def construct(requests: list[Request]) -> list[str]:
        unique = {(r.question, r.wrong, r.right): r.prompt for r in requests}
        texts = chat_texts(rollout, tokenizer, list(unique.values()), sampling, chat_template_kwargs,
                           device=device, batch=batch)
        out = dict(zip(unique, texts))
        return [out[(r.question, r.wrong, r.right)] for r in requests]

    return construct


def pool_grader(pool, timeout: float | None = None) -> Grader:
    """A grader over a :class:`tapo_ds.reward.GradingPool`: one ``grade`` call per batch."""
    def grade(pairs):
        return list(pool.grade(list(pairs), timeout=timeout).correct)
    return grade


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
    prompt_template: str = "{problem}",
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

    sel = select_pairs(flat_rewards, group_index, n_pos=n_pos, n_neg=n_neg, m_max=m_max, rng=random.Random(seed))
    budget = max_prompt_tokens if count_tokens is not None else None
    reqs = build_requests(sel.pairs, questions, texts, template=construction_template, budget_tokens=budget,
                          count_tokens=count_tokens)
    stats.candidates, stats.pairs, stats.too_long = sel.n_candidates, len(sel.pairs), reqs.n_skipped
    outputs = constructor([Request(prompt, questions[p.group], texts[p.neg], texts[p.pos])
                           for prompt, p in zip(reqs.prompts, reqs.pairs)]) if reqs.pairs else []
    stats.constructed = sum(isinstance(o, str) for o in outputs)
    parsed = parse_outputs(reqs, [o if isinstance(o, str) else "" for o in outputs])
    stats.parsed = parsed.n_parsed
    verdicts = grader([(c.reconstruction, answers[p.group]) for p, c in zip(parsed.pairs, parsed.items)]) \
        if parsed.items else []
    if len(verdicts) != parsed.n_parsed:
        raise ValueError(f"grader returned {len(verdicts)} verdicts for {parsed.n_parsed} responses")
    verified = assemble(parsed, [float(bool(ok)) for ok in verdicts], texts=texts, keep_failed=False).samples

    prompt_of = dict(zip(reqs.pairs, reqs.prompts))
    output_of = dict(zip(reqs.pairs, outputs))
    sft, ift, examples = [], [], []
    seen_sft, seen_ift = set(), set()
    for c in verified:
        stats.verified += 1
        stats.fidelity_sum += c.prefix_fidelity
        if min_fidelity is not None and c.prefix_fidelity < min_fidelity:
            stats.low_fidelity += 1
            continue
        question = questions[c.group]
        sft_row = {"prompt": prompt_template.replace("{problem}", question), "response": c.reconstruction,
                   "kind": "sft"}
        ift_row = {"prompt": prompt_of[c.pair], "response": format_construction(c.analysis, c.reconstruction),
                   "kind": "ift"} if c.analysis else None
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
            examples.append({"question": question, "wrong": texts[c.pair.neg], "right": texts[c.pair.pos],
                             "construction": output_of[c.pair], "analysis": c.analysis,
                             "reconstruction": c.reconstruction, "prefix_fidelity": c.prefix_fidelity})
    stats.kept_sft, stats.kept_ift = len(sft), len(ift)
    return ColdStartResult(sft=sft, ift=ift, stats=stats, examples=examples)
