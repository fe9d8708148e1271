"""The constructor probe: how well a checkpoint constructs on ITS OWN wrong/right pairs.

    python -m tapo_ds.synthetic probe-constructor --model checkpoints/miniature-coldstart \\
        [--config configs/quickstart.yaml] [--questions 200] [--seed 0] [--out bench/results/probe.md]

On held-out questions (``evaluation.files`` of the config, else ``data/synthetic/test.jsonl``)
it does what one TAPO step does, with the config's settings, outside the trainer:

1. samples K answers per question at the rollout settings (``rollout.*``) and grades them;
2. pairs wrong and right answers with TAPO's own DCS (``select_pairs``, ``tapo.n_pos/n_neg/m_max``)
   and renders the construction prompts (``build_requests``, ``tapo.template`` and its budget);
3. constructs with the model at the construction settings (``tapo.max_new_tokens/temperature/top_p``),
   or with the synthetic rule constructor standing in (``--constructor rule``: the reference the
   measures must score perfectly on), parses (``parse_outputs``) and grades the reconstructions;
4. reports: parse rate, the share of reconstructions whose reflection comes right after the first
   wrong step of y⁻ (:func:`reflection_located`, from re-computing every step line), prefix
   fidelity (median and mean), construction accuracy, the share of reflected groups (the
   constructions of one question, size >= 2) whose rewards are mixed, and, with
   ``--eval-samples`` > 0, held-out pass@1 at the evaluation settings (``evaluation.*``).

Grading is the synthetic task's in-process integer check (``synthetic_grader``), which agrees with
the trainer's math-verify grading on this task. Needs no DeepSpeed engine: a plain HF model drives
the project's own decode loop (``TapoRollout``).
"""

from __future__ import annotations

import collections
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..trajectory import build_requests, find_reflection, parse_outputs, prefix_fidelity, select_pairs
from .constructor import diagnose, rule_constructor
from .mix import synthetic_grader
from .task import parse_step

DEFAULT_TEST_FILE = "data/synthetic/test.jsonl"
OFFSET_ORDER = ("< -2", "-2", "-1", "0", "1", "2", "> 2", "no reflection", "no mistake")


def reflection_located(question: str, wrong: str, reconstruction: str) -> bool | None:
    """Whether the reconstruction's reflection comes right after the first wrong step of ``wrong``.

    The first wrong step is what :func:`~tapo_ds.synthetic.constructor.diagnose` finds by
    re-computing every step line (and the writer's own checks); the reflection point is
    :func:`tapo_ds.trajectory.find_reflection` (y⁻'s own copied checks skipped). Located: the
    text before the reflection has as many non-blank lines as y⁻ up to and including its first
    wrong step. None when ``wrong`` has no readable mistake (nothing to locate).
    """
    offset = reflection_offset(question, wrong, reconstruction)
    return None if offset == "no mistake" else offset == 0


def reflection_offset(question: str, wrong: str, reconstruction: str) -> int | str:
    """Lines before the reflection minus lines of y⁻ up to and including its first wrong step (0: located;
    +1: one line late); "no reflection", or "no mistake" when ``wrong`` has no readable mistake."""
    diagnosis = diagnose(question, wrong)
    if diagnosis is None:
        return "no mistake"
    pos = find_reflection(reconstruction, wrong=wrong)
    if pos is None:
        return "no reflection"
    return len(_lines(reconstruction[:pos])) - len(_lines(diagnosis.prefix))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def reflection_at_first_difference(wrong: str, right: str, reconstruction: str) -> bool | None:
    """Whether the reflection comes right after the first step line where y⁻ and y⁺ differ (what a
    constructor that compares the two answers step by step finds; the first wrong step of y⁻ only when y⁺'s
    steps are right). Re-check lines are not compared. None when no step line differs."""
    a = [(i, line) for i, line in enumerate(_lines(wrong)) if parse_step(line) is not None]
    b = [line for line in _lines(right) if parse_step(line) is not None]
    first = next((i for (i, x), y in zip(a, b) if x != y), None)
    if first is None:
        return None
    pos = find_reflection(reconstruction, wrong=wrong)
    return pos is not None and len(_lines(reconstruction[:pos])) == first + 1


@dataclass
class ProbeReport:
    questions: int = 0
    samples_per_question: int = 0
    rollout_acc: float = 0.0
    candidates: int = 0
    pairs: int = 0
    skipped_long: int = 0
    parse_rate: float | None = None
    reflection_located: float | None = None   # over parsed constructions whose y⁻ has a readable mistake
    # diagnostics of the location: y⁺ whose every step is right (not only its answer), the location over those
    # pairs, and the reflection placed after the first line where y⁻ and y⁺ differ
    reflection_offsets: dict = field(default_factory=dict)  # reflection_offset -> share of the parsed pairs
    right_steps_correct: float | None = None
    reflection_located_steps_correct: float | None = None
    reflection_at_first_difference: float | None = None
    prefix_fidelity_median: float | None = None
    prefix_fidelity_mean: float | None = None
    construction_acc: float | None = None
    # construction_acc split by where the reflection came: right after y⁻'s first wrong step, or elsewhere
    construction_acc_located: float | None = None
    construction_acc_elsewhere: float | None = None
    reflected_groups: int = 0                 # questions with >= 2 parsed constructions
    reflected_mixed_frac: float | None = None
    eval_pass_at_1: float | None = None
    settings: dict = field(default_factory=dict)
    wall_s: float = 0.0
    examples: list = field(default_factory=list)  # the first constructions, with their measures

    def table(self) -> str:
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f} %"

        def num(x):
            return "n/a" if x is None else f"{x:.3f}"

        rows = [
            ("output parses", pct(self.parse_rate), ">= 95 %"),
            ("reflection right after the first wrong step of y⁻", pct(self.reflection_located), ">= 70 %"),
            ("prefix fidelity, median (mean)",
             f"{num(self.prefix_fidelity_median)} ({num(self.prefix_fidelity_mean)})", ">= 0.9"),
            ("reconstruction reaches the right answer (construction_acc)", pct(self.construction_acc), "30-75 %"),
            (f"reflected groups with mixed rewards (of {self.reflected_groups})",
             pct(self.reflected_mixed_frac), ">= 50 %"),
            ("held-out pass@1 at the evaluation settings", pct(self.eval_pass_at_1), "30-55 %"),
        ]
        out = ["| measure | value | target |", "|---|---|---|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        out.append("")
        out.append(f"Location diagnostics: y⁺ with every step right (not only its answer) in "
                   f"{pct(self.right_steps_correct)} of the pairs; over those, the reflection right after the first "
                   f"wrong step of y⁻ in {pct(self.reflection_located_steps_correct)}; over all pairs, the reflection "
                   f"right after the first line where y⁻ and y⁺ differ in {pct(self.reflection_at_first_difference)}. "
                   f"Where the reflection comes, in lines after y⁻'s first wrong step (0: right after it): "
                   + ", ".join(f"{k}: {pct(v)}" for k, v in self.reflection_offsets.items()) + ". "
                   f"construction_acc where the reflection is right after that step {pct(self.construction_acc_located)}, "
                   f"where it is elsewhere {pct(self.construction_acc_elsewhere)}.")
        out.append("")
        out.append(f"{self.questions} held-out questions x {self.samples_per_question} samples (rollout accuracy "
                   f"{pct(self.rollout_acc)}), {self.candidates} DCS candidates, {self.pairs} pairs "
                   f"({self.skipped_long} over the construction budget), {self.wall_s:.0f} s.")
        return "\n".join(out)


class _Grader:
    """The ``grade(pairs, require_box=...)`` interface of the grading pool, in-process."""

    class _Result:
        def __init__(self, correct):
            self.correct = correct

    def grade(self, pairs, require_box: bool = True, timeout=None):
        return self._Result(synthetic_grader(pairs))


def summarize(questions: Sequence[str], texts: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]], *,
              construct: Callable[[list[str]], list[str]], n_pos: int, n_neg: int, m_max: int, template: str,
              budget_tokens: int | None, count_tokens: Callable[[str], int] | None, answers: Sequence[str],
              seed: int, n_examples: int = 6) -> ProbeReport:
    """The probe's measures from sampled answers; ``construct`` maps construction prompts to outputs."""
    flat, flat_rewards, group_index = [], [], []
    for g, (resp, rew) in enumerate(zip(texts, rewards)):
        flat += list(resp)
        flat_rewards += [float(r) for r in rew]
        group_index += [g] * len(resp)
    rep = ProbeReport(questions=len(questions), samples_per_question=max((len(t) for t in texts), default=0))
    rep.rollout_acc = sum(flat_rewards) / max(1, len(flat_rewards))
    sel = select_pairs(flat_rewards, group_index, n_pos=n_pos, n_neg=n_neg, m_max=m_max, rng=random.Random(seed))
    rep.candidates = sel.n_candidates
    reqs = build_requests(sel.pairs, list(questions), flat, template=template, budget_tokens=budget_tokens,
                          count_tokens=count_tokens)
    rep.pairs, rep.skipped_long = len(sel.pairs), reqs.n_skipped
    parsed = parse_outputs(reqs, construct(reqs.prompts) if reqs.prompts else [])
    if reqs.pairs:
        rep.parse_rate = parsed.n_parsed / len(reqs.pairs)
    verdicts = synthetic_grader([(c.reconstruction, answers[p.group]) for p, c in zip(parsed.pairs, parsed.items)])
    fidelity, located, by_group = [], [], {}
    clean, located_clean, at_difference = [], [], []
    acc_located, acc_elsewhere = [], []
    offsets: collections.Counter = collections.Counter()
    for pair, item, ok in zip(parsed.pairs, parsed.items, verdicts):
        wrong, right = flat[pair.neg], flat[pair.pos]
        fidelity.append(prefix_fidelity(item.reconstruction, wrong))
        offset = reflection_offset(questions[pair.group], wrong, item.reconstruction)
        where = None if offset == "no mistake" else offset == 0
        offsets[str(offset) if isinstance(offset, str) or abs(offset) <= 2 else ("< -2" if offset < 0 else "> 2")] += 1
        steps_right = diagnose(questions[pair.group], right) is None
        clean.append(steps_right)
        if where is not None:
            located.append(where)
            (acc_located if where else acc_elsewhere).append(bool(ok))
            if steps_right:
                located_clean.append(where)
        at = reflection_at_first_difference(wrong, right, item.reconstruction)
        if at is not None:
            at_difference.append(at)
        by_group.setdefault(pair.group, []).append(bool(ok))
        if len(rep.examples) < n_examples:
            rep.examples.append({"question": questions[pair.group], "wrong": wrong, "right": flat[pair.pos],
                                 "reconstruction": item.reconstruction, "prefix_fidelity": fidelity[-1],
                                 "reflection_located": where, "correct": bool(ok)})
    if parsed.items:
        rep.prefix_fidelity_median = statistics.median(fidelity)
        rep.prefix_fidelity_mean = statistics.fmean(fidelity)
        rep.construction_acc = sum(verdicts) / len(verdicts)
    if located:
        rep.reflection_located = sum(located) / len(located)
    if acc_located:
        rep.construction_acc_located = sum(acc_located) / len(acc_located)
    if acc_elsewhere:
        rep.construction_acc_elsewhere = sum(acc_elsewhere) / len(acc_elsewhere)
    if offsets:
        total = sum(offsets.values())
        rep.reflection_offsets = {k: offsets[k] / total for k in OFFSET_ORDER if k in offsets}
    if clean:
        rep.right_steps_correct = sum(clean) / len(clean)
    if located_clean:
        rep.reflection_located_steps_correct = sum(located_clean) / len(located_clean)
    if at_difference:
        rep.reflection_at_first_difference = sum(at_difference) / len(at_difference)
    groups = [g for g in by_group.values() if len(g) >= 2]
    rep.reflected_groups = len(groups)
    if groups:
        rep.reflected_mixed_frac = sum(1 for g in groups if any(g) and not all(g)) / len(groups)
    return rep


PAIR_SOURCES = ("own", "injected")


def injected_answers(problems: Sequence[str], samples: int, seed: int, right: int = 2) -> tuple[list, list]:
    """Per problem ``right`` gold solutions and ``samples - right`` rule-injected wrong ones (the errors the cold
    start's construction rows are built from), with their rewards: pairs from the cold start's training
    distribution, to set against its own answers."""
    from .errors import random_wrong_solution
    from .task import parse_problem

    rng = random.Random(f"injected:{seed}")
    texts, rewards = [], []
    for text in problems:
        problem = parse_problem(text)
        texts.append([problem.solution] * right + [random_wrong_solution(problem, rng).text
                                                   for _ in range(samples - right)])
        rewards.append([1.0] * right + [0.0] * (samples - right))
    return texts, rewards


def run_probe(model_path: str, config_path: str, *, questions: int, seed: int, constructor: str = "model",
              eval_samples: int = 5, threads: int = 0, overrides: Sequence[str] = (),
              n_examples: int = 6, pairs: str = "own") -> ProbeReport:
    import torch

    from .. import modeling
    from ..config import load_config
    from ..data import encode, load_examples, prepare, render_chat
    from ..generation import chat_texts
    from ..prefilter import sample_and_grade
    from ..rollout import TapoRollout
    from ..runtime import sampling_of
    from ..trajectory import load_template

    t0 = time.perf_counter()
    cfg = load_config(config_path, list(overrides))
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    d, r, t, e = cfg.data, cfg.rollout, cfg.tapo, cfg.evaluation
    tok = modeling.load_tokenizer(model_path)
    model = modeling.load_model(model_path).eval()
    rollout = TapoRollout(model, tok, modeling.stop_token_ids(tok, model.config), tok.pad_token_id, seed=seed)
    rollout.sync_weights(0)
    test_file = next(iter(e.files.values()), DEFAULT_TEST_FILE) if e.files else DEFAULT_TEST_FILE
    examples = load_examples([test_file], d.problem_field, d.answer_field, d.split, questions)
    prompted, _ = prepare(examples, tok, d.prompt_template, cfg.model.chat_template_kwargs, d.max_prompt_tokens)
    grader = _Grader()

    def sample(sampling):
        return sample_and_grade(prompted, rollout=rollout, grader=grader, tokenizer=tok, sampling=sampling,
                                batch_questions=cfg.prefilter.batch_questions, device="cpu")

    rollout_sampling = sampling_of(r, r.samples_per_question)
    problems = [q.example.problem for q in prompted]
    if pairs == "own":
        texts, rewards = sample(rollout_sampling)
    elif pairs == "injected":
        texts, rewards = injected_answers(problems, r.samples_per_question, seed)
    else:
        raise ValueError(f"--pairs: expected one of {PAIR_SOURCES}, got {pairs!r}")
    template = load_template(t.template or t.construction)
    cons_sampling = sampling_of(t, 1)

    def count(prompt: str) -> int:
        return len(encode(tok, render_chat(tok, prompt, cfg.model.chat_template_kwargs)))

    if constructor == "rule":
        rule = rule_constructor(t.construction)
        by_prompt: dict[str, str] = {}

        def construct(prompts: list[str]) -> list[str]:
            return [by_prompt.get(p, "") for p in prompts]

        # the rule constructor reads the pair, not the prompt: map each prompt back to its pair
        flat = [x for resp in texts for x in resp]
        gidx = [g for g, resp in enumerate(texts) for _ in resp]
        sel = select_pairs([x for rew in rewards for x in rew], gidx, n_pos=t.n_pos, n_neg=t.n_neg, m_max=t.m_max,
                           rng=random.Random(seed))
        reqs = build_requests(sel.pairs, problems, flat, template=template, budget_tokens=t.max_prompt_tokens,
                              count_tokens=count)
        for prompt, pair in zip(reqs.prompts, reqs.pairs):
            by_prompt[prompt] = rule(problems[pair.group], flat[pair.neg], flat[pair.pos]) or ""
    elif constructor == "model":
        chunk = max(1, cfg.prefilter.batch_questions)

        def construct(prompts: list[str]) -> list[str]:
            return chat_texts(rollout, tok, prompts, cons_sampling, cfg.model.chat_template_kwargs, batch=chunk)
    else:
        raise ValueError(f"--constructor: expected 'model' or 'rule', got {constructor!r}")

    rep = summarize(problems, texts, rewards, construct=construct, n_pos=t.n_pos, n_neg=t.n_neg, m_max=t.m_max,
                    template=template, budget_tokens=t.max_prompt_tokens, count_tokens=count,
                    answers=[q.example.answer for q in prompted], seed=seed, n_examples=n_examples)
    if eval_samples:
        _, ev = sample(sampling_of(e, eval_samples))
        rep.eval_pass_at_1 = sum(map(sum, ev)) / max(1, eval_samples * len(ev))
    rep.settings = {
        "model": model_path, "config": config_path, "test_file": test_file, "constructor": constructor,
        "pairs": pairs,
        "seed": seed, "rollout": asdict(rollout_sampling),
        "construction": asdict(cons_sampling), "dcs": {"n_pos": t.n_pos, "n_neg": t.n_neg, "m_max": t.m_max},
        "evaluation": {"temperature": e.temperature, "top_p": e.top_p, "samples": eval_samples,
                       "max_new_tokens": e.max_new_tokens},
    }
    rep.wall_s = time.perf_counter() - t0
    return rep


def write_report(rep: ProbeReport, path: str | Path, command: str) -> None:
    """``path`` (markdown: the command, the table, the JSON) and ``path`` with ``.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(rep)
    path.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    path.write_text(f"# Constructor probe\n\nCommand: `{command}`\n\n{rep.table()}\n\n```json\n"
                    f"{json.dumps(data, indent=2)}\n```\n", encoding="utf-8")
