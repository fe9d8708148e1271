"""TAPO's construct phase: select pairs, generate every construction of the step in one
rollout call, parse, verify with the same grader, assemble samples.

The pure pieces live in ``tapo_ds.trajectory``; this class wires them to the rollout
engine, the grader, the tokenizer and the metrics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

from deepspeed.runtime.rollout.base import SamplingConfig

from tapo_ds.batch import Sample
from tapo_ds.data import encode, render_chat
from tapo_ds.generation import generate
from tapo_ds.lookup_draft import LookupDraft
from tapo_ds.metrics import StepMetrics
from tapo_ds.trajectory import (
    ConstructionRequests,
    ConstructionStats,
    Pair,
    SelectionResult,
    assemble,
    build_requests,
    load_template,
    parse_outputs,
    select_pairs,
)
from tapo_ds.trajectory.backends import BackendContext, ConstructionJob, build_backend


@dataclass
class Plan:
    """The step's construction requests, question by question, and what they were drawn from."""

    selection: SelectionResult = field(default_factory=lambda: SelectionResult(pairs=[], n_groups=0, n_candidates=0))
    requests: ConstructionRequests = field(default_factory=lambda: ConstructionRequests(prompts=[], pairs=[]))
    prompt_ids: list[list[int]] = field(default_factory=list)  # chat-rendered and tokenised, one per request

    def add(self, sel: SelectionResult, reqs: ConstructionRequests, prompt_ids: list[list[int]]) -> None:
        self.selection.pairs += sel.pairs
        self.selection.n_groups += sel.n_groups
        self.selection.n_candidates += sel.n_candidates
        self.selection.candidate_groups += sel.candidate_groups
        self.requests.prompts += reqs.prompts
        self.requests.pairs += reqs.pairs
        self.requests.skipped += reqs.skipped
        self.prompt_ids += prompt_ids

    def merged(self, parts: dict[int, "Plan"]) -> "Plan":
        """Plans of single questions, in question order, after this one."""
        for q in sorted(parts):
            self.add(parts[q].selection, parts[q].requests, parts[q].prompt_ids)
        return self


@dataclass(frozen=True)
class ConstructSettings:
    n_pos: int
    n_neg: int
    m_max: int
    template: str
    budget_tokens: int
    sampling: SamplingConfig
    construction: str  # micro | full
    prefix: str  # regenerate | splice
    keep_failed: bool
    chat_template_kwargs: dict
    examples_every: int
    examples: int
    seed: int
    backend: str  # who writes the constructions: a name of tapo_ds.trajectory.backends
    oracle_accuracy: float
    lookup: LookupDraft = field(default_factory=lambda: LookupDraft(tokens=0))  # prompt-lookup drafts (0: off)
    prefix_loss: str = "train"  # train | mask: the re-typed y⁻ part in the loss or not


class Constructor:
    def __init__(self, settings: ConstructSettings, *, tokenizer, rollout, grader, info, monitor=None):
        self.s = settings
        self.tok, self.rollout, self.grader, self.info, self.monitor = tokenizer, rollout, grader, info, monitor
        self.backend = build_backend(settings.backend, BackendContext(
            generate=self._generate, construction=settings.construction, seed=settings.seed,
            oracle_accuracy=settings.oracle_accuracy))
        self._generated_tokens = 0  # by the policy for this step's constructions
        self._drafts = [0, 0]  # prompt-lookup draft tokens proposed and kept for them

    @classmethod
    def from_config(cls, cfg, **parts) -> "Constructor":
        """``parts``: the keywords of ``__init__`` after the settings."""
        from tapo_ds.runtime import sampling_of

        t = cfg.tapo
        return cls(ConstructSettings(
            n_pos=t.n_pos, n_neg=t.n_neg, m_max=t.m_max, template=load_template(t.template or t.construction),
            budget_tokens=t.max_prompt_tokens, sampling=sampling_of(t, 1), construction=t.construction, prefix=t.prefix,
            keep_failed=t.keep_failed_constructions,
            chat_template_kwargs=cfg.model.chat_template_kwargs, examples_every=t.examples_every,
            examples=t.examples, seed=cfg.seed, backend=t.constructor, oracle_accuracy=t.oracle_accuracy,
            lookup=LookupDraft(tokens=t.lookup_draft_tokens, min_match=t.lookup_min_match,
                               max_match=max(LookupDraft.max_match, t.lookup_min_match)),
            prefix_loss=t.prefix_loss), **parts)

    def _encode_chat(self, content: str) -> list[int]:
        return encode(self.tok, render_chat(self.tok, content, self.s.chat_template_kwargs))

    @property
    def lookup(self) -> Optional[LookupDraft]:
        """The drafts the constructions' decode verifies, when it can (see :mod:`tapo_ds.lookup_draft`)."""
        if not self.s.lookup.on or not getattr(self.rollout, "takes_lookup", False):
            return None
        return self.s.lookup

    @property
    def generates(self) -> bool:
        """Whether the policy writes the constructions (then they can start inside the rollout)."""
        return self.s.backend == "policy"

    def plan(self, out, step: int, questions: Sequence[int]) -> Plan:
        """Pairs and construction prompts of ``questions`` (indices into ``out.questions``, whose samples have
        their rewards). Each question draws its pairs from its own random stream, so the plan of a question
        does not depend on which others are planned with it, nor when."""
        plan = Plan()
        by_question: dict[int, list[int]] = {}
        for i, s in enumerate(out.samples):
            if s is not None:  # inside the rollout, questions still decoding have no samples yet
                by_question.setdefault(s.question, []).append(i)
        problems = [q.example.problem for q in out.questions]
        for q in questions:
            rows = by_question.get(q, [])
            rng = random.Random(f"{self.s.seed}:{self.info.rank}:{step}:{q}")
            sel = select_pairs([out.samples[i].reward for i in rows], [q] * len(rows), n_pos=self.s.n_pos,
                               n_neg=self.s.n_neg, m_max=self.s.m_max, rng=rng)
            pairs = [Pair(group=q, neg=rows[p.neg], pos=rows[p.pos]) for p in sel.pairs]
            prompt_ids: dict[str, list[int]] = {}  # tokenised once, for the budget and for generation

            def count(prompt: str) -> int:
                prompt_ids[prompt] = self._encode_chat(prompt)
                return len(prompt_ids[prompt])

            reqs = build_requests(pairs, problems, out.texts, template=self.s.template,
                                  budget_tokens=self.s.budget_tokens, count_tokens=count)
            plan.add(sel, reqs, [prompt_ids[p] for p in reqs.prompts])
        return plan

    def construct(self, out, step: int) -> tuple[list[Sample], StepMetrics]:
        """``out`` is the step's ``RolloutOut`` with rewards filled in: every construction after the rollout."""
        plan = self.plan(out, step, range(len(out.questions)))
        problems = [q.example.problem for q in out.questions]
        outputs = self.backend(ConstructionJob.of(plan.requests, problems, out.texts, plan.prompt_ids,
                                                  step=step, rank=self.info.rank))
        return self.complete(out, plan, outputs, step)

    def complete(self, out, plan: Plan, outputs: Sequence[str], step: int,
                 generated_tokens: int = 0) -> tuple[list[Sample], StepMetrics]:
        """Parse, verify and assemble ``outputs`` (one per request of ``plan``, in its order)."""
        self._generated_tokens += generated_tokens
        samples = out.samples
        parsed = parse_outputs(plan.requests, outputs)
        answers = [out.questions[p.group].example.answer for p in parsed.pairs]
        graded = None
        if parsed.items:
            graded = self.grader.grade([(c.reconstruction, a) for c, a in zip(parsed.items, answers)],
                                       require_box=True)
        rewards = [float(ok) for ok in graded.correct] if graded else []
        result = assemble(
            parsed, rewards, prompt_ids=[q.prompt_ids for q in out.questions], texts=out.texts,
            encode=lambda text: encode(self.tok, text), eos_id=self.tok.eos_token_id,
            construction=self.s.construction, prefix=self.s.prefix, keep_failed=self.s.keep_failed,
            response_ids=[s.response_ids for s in samples],
            decode=lambda ids: self.tok.decode(ids, skip_special_tokens=False), selection=plan.selection,
            requests=plan.requests)
        constructed = [Sample(prompt_ids=c.prompt_ids, response_ids=c.response_ids,
                              group_id=samples[c.pair.neg].group_id, reward=c.reward, question=c.group,
                              constructed=True, prefix_tokens=c.prefix_tokens,
                              loss_start=c.prefix_tokens if self.s.prefix_loss == "mask" else 0)
                       for c in result.samples]
        if self.monitor is not None and self.s.examples_every and step % self.s.examples_every == 0:
            self._log_examples(out, result.samples, step)
        return constructed, self._metrics(result.stats, graded)

    def _generate(self, prompts: list[list[int]]) -> list[str]:
        """All constructions of the step in one call (the weights were synced for the rollout)."""
        out = generate(self.rollout, self.tok, prompts, self.s.sampling, self.info.device, lookup=self.lookup)
        self._generated_tokens += sum(out.lengths)
        self.count_drafts(int(out.stats.get("draft_tokens", 0)), int(out.stats.get("draft_accepted", 0)))
        return out.texts

    def count_drafts(self, proposed: int, kept: int) -> None:
        """Prompt-lookup draft tokens of this step's construction decode (logged when drafts are on)."""
        self._drafts[0] += proposed
        self._drafts[1] += kept

    def _metrics(self, stats: ConstructionStats, graded) -> StepMetrics:
        m = StepMetrics()
        stats.add_to(m)
        m.sum("tapo/generated_tokens", self._generated_tokens)  # what the constructions cost in decoding
        self._generated_tokens = 0
        if self.lookup is not None:
            m.sum("tapo/draft_tokens", self._drafts[0])
            m.sum("tapo/draft_accepted", self._drafts[1])
        self._drafts = [0, 0]
        if graded is not None:
            m.local("tapo/grade_timeouts", graded.timeouts)
        return m

    def _log_examples(self, out, constructed, step: int) -> None:
        for i, c in enumerate(constructed[:self.s.examples]):
            q = out.questions[c.group].example
            text = (f"QUESTION:\n{q.problem}\n\nWRONG ANSWER:\n{out.texts[c.pair.neg]}\n\n"
                    f"RIGHT ANSWER:\n{out.texts[c.pair.pos]}\n\nANALYSIS:\n{c.analysis}\n\n"
                    f"RECONSTRUCTION:\n{c.reconstruction}\n\nREWARD: {c.reward}   GOLD: {q.answer}   "
                    f"PREFIX FIDELITY: {c.prefix_fidelity:.2f}")
            self.monitor.text(f"tapo/construction_{i}", text, step)
