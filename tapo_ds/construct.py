"""TAPO's construct phase: select pairs, generate every construction of the step in one
rollout call, parse, verify with the same grader, assemble samples; and OTS weights.

The pure pieces live in ``tapo_ds.trajectory``; this class wires them to the rollout
engine, the grader, the tokenizer and the metrics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from deepspeed.runtime.rollout.base import RolloutRequest, SamplingConfig

from tapo_ds.batch import MicroBatch, Sample, left_pad
from tapo_ds.data import encode, render_chat
from tapo_ds.engine import all_reduce_
from tapo_ds.trajectory import (
    ConstructionStats,
    assemble,
    build_requests,
    load_template,
    ots_token_weights,
    ots_weight_sums,
    ots_weights,
    parse_outputs,
    select_pairs,
)
from tapo_ds.trajectory.backends import BackendContext, ConstructionJob, build_backend


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
    ots: bool
    w_min: float
    w_max: float
    chat_template_kwargs: dict
    examples_every: int
    examples: int
    seed: int
    backend: str  # who writes the constructions: a name of tapo_ds.trajectory.backends
    oracle_accuracy: float


class Constructor:
    def __init__(self, settings: ConstructSettings, tokenizer, rollout, info, monitor=None):
        self.s = settings
        self.tok, self.rollout, self.info, self.monitor = tokenizer, rollout, info, monitor
        self.grader = None  # set by the stage once the grading pool is up
        self.ots_enabled = settings.ots
        self.backend = build_backend(settings.backend, BackendContext(
            generate=self._generate, construction=settings.construction, seed=settings.seed,
            oracle_accuracy=settings.oracle_accuracy))
        self._generated_tokens = 0  # by the policy for this step's constructions
        self._ots_sum = torch.zeros(2, dtype=torch.float64)  # weight sum, token count

    @classmethod
    def from_config(cls, cfg, tokenizer, rollout, info, monitor=None) -> "Constructor":
        t = cfg.tapo
        template = load_template(t.template or t.construction)
        sampling = SamplingConfig(max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_p=t.top_p,
                                  n_samples_per_prompt=1)
        return cls(ConstructSettings(
            n_pos=t.n_pos, n_neg=t.n_neg, m_max=t.m_max, template=template, budget_tokens=t.max_prompt_tokens,
            sampling=sampling, construction=t.construction, prefix=t.prefix,
            keep_failed=t.keep_failed_constructions, ots=t.ots, w_min=t.ots_w_min, w_max=t.ots_w_max,
            chat_template_kwargs=cfg.model.chat_template_kwargs, examples_every=t.examples_every,
            examples=t.examples, seed=cfg.seed, backend=t.constructor, oracle_accuracy=t.oracle_accuracy),
            tokenizer, rollout, info, monitor)

    def _encode_chat(self, content: str) -> list[int]:
        return encode(self.tok, render_chat(self.tok, content, self.s.chat_template_kwargs))

    def construct(self, out, step: int) -> tuple[list[Sample], dict]:
        """``out`` is the step's ``RolloutOut`` with rewards filled in."""
        samples = out.samples
        rng = random.Random(f"{self.s.seed}:{self.info.rank}:{step}")
        sel = select_pairs([s.reward for s in samples], [s.question for s in samples], n_pos=self.s.n_pos,
                           n_neg=self.s.n_neg, m_max=self.s.m_max, rng=rng)
        problems = [q.example.problem for q in out.questions]
        prompt_cache: dict[str, list[int]] = {}  # tokenised once, for the budget and for generation

        def count(prompt: str) -> int:
            prompt_cache[prompt] = self._encode_chat(prompt)
            return len(prompt_cache[prompt])

        reqs = build_requests(sel.pairs, problems, out.texts, template=self.s.template,
                              budget_tokens=self.s.budget_tokens, count_tokens=count)
        outputs = self.backend(ConstructionJob.of(reqs, problems, out.texts, [prompt_cache[p] for p in reqs.prompts],
                                                  step=step, rank=self.info.rank))
        parsed = parse_outputs(reqs, outputs)
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
            decode=lambda ids: self.tok.decode(ids, skip_special_tokens=False), selection=sel, requests=reqs)
        constructed = [Sample(prompt_ids=c.prompt_ids, response_ids=c.response_ids,
                              group_id=samples[c.pair.neg].group_id, reward=c.reward, question=c.group,
                              constructed=True) for c in result.samples]
        if self.monitor is not None and self.s.examples_every and step % self.s.examples_every == 0:
            self._log_examples(out, result.samples, step)
        return constructed, self._global_metrics(result.stats, graded)

    def _generate(self, prompts: list[list[int]]) -> list[str]:
        """All constructions of the step in one call (the weights were synced for the rollout)."""
        if not prompts:
            return []
        ids, mask = left_pad(prompts, self.tok.pad_token_id)
        res = self.rollout.generate(RolloutRequest(ids.to(self.info.device), mask.to(self.info.device)),
                                    self.s.sampling)
        self._generated_tokens += int(res.response_lengths.sum())
        return [self.tok.decode(res.response_ids[i, :n].tolist(), skip_special_tokens=True)
                for i, n in enumerate(res.response_lengths.tolist())]

    def _global_metrics(self, stats: ConstructionStats, graded) -> dict:
        keys = [f for f in stats.__dataclass_fields__]
        values = [float(getattr(stats, k)) for k in keys] + [float(self._generated_tokens)]
        self._generated_tokens = 0
        t = torch.tensor(values, dtype=torch.float64, device=self.info.device)
        all_reduce_(t, "sum")
        total = ConstructionStats(**{k: type(getattr(stats, k))(v) for k, v in zip(keys, t.tolist())})
        metrics = total.metrics()
        metrics["tapo/generated_tokens"] = float(t[-1])  # what the constructions cost in decoding
        if graded is not None:
            metrics["tapo/grade_timeouts"] = float(graded.timeouts)
        return metrics

    # ------------------------------------------------------------------ OTS

    def ots_weight_fn(self):
        """Weights from the training forward itself (on-policy: it is the pre-update policy)."""
        def fn(mb: MicroBatch, logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
            constructed = mb.part.bool()
            w = ots_token_weights(logp, entropy, mb.response_mask, constructed, enabled=True,
                                  w_min=self.s.w_min, w_max=self.s.w_max)
            s, n = ots_weight_sums(w, mb.response_mask, constructed)
            self._ots_sum += torch.tensor([s, n], dtype=torch.float64)
            return w
        return fn

    def ots_weights(self, samples: list[Sample], old_logp, entropy) -> list[torch.Tensor]:
        """Per-sample weights from the separate old-log-prob pass (several updates per rollout)."""
        out = []
        for s, lp, ent in zip(samples, old_logp, entropy):
            if not s.constructed:
                out.append(torch.ones_like(lp))
                continue
            w = ots_weights(lp[None], ent[None], torch.ones_like(lp)[None], w_min=self.s.w_min,
                            w_max=self.s.w_max)[0]
            self._ots_sum += torch.tensor([float(w.sum()), float(w.numel())], dtype=torch.float64)
            out.append(w)
        return out

    def pop_ots_metrics(self, device) -> dict:
        t = all_reduce_(self._ots_sum.to(device), "sum").cpu()
        self._ots_sum = torch.zeros(2, dtype=torch.float64)
        return {"tapo/ots_weight_mean": float(t[0] / t[1])} if t[1] > 0 else {}

    def _log_examples(self, out, constructed, step: int) -> None:
        for i, c in enumerate(constructed[:self.s.examples]):
            q = out.questions[c.group].example
            text = (f"QUESTION:\n{q.problem}\n\nWRONG ANSWER:\n{out.texts[c.pair.neg]}\n\n"
                    f"RIGHT ANSWER:\n{out.texts[c.pair.pos]}\n\nANALYSIS:\n{c.analysis}\n\n"
                    f"RECONSTRUCTION:\n{c.reconstruction}\n\nREWARD: {c.reward}   GOLD: {q.answer}   "
                    f"PREFIX FIDELITY: {c.prefix_fidelity:.2f}")
            self.monitor.text(f"tapo/construction_{i}", text, step)
