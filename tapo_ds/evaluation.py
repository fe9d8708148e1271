"""In-training evaluation: held-out problems every N steps, pass@k logged as ``eval/<set>/pass@k``.

Same rollout engine and grader as training, the evaluation protocol's sampling (docs/method.md §Evaluation:
temperature 0.6, top-p 0.9, n samples per problem) and the unbiased pass@k estimator of
``eval.metrics`` — one definition for the trainer and the lm-eval tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.runtime.rollout.base import SamplingConfig

from eval.metrics import pass_at_k
from tapo_ds.data import PromptedExample
from tapo_ds.generation import generate
from tapo_ds.metrics import StepMetrics
from tapo_ds.trajectory import reflects


@dataclass(frozen=True)
class EvalSettings:
    every: int
    sampling: SamplingConfig  # n_samples_per_prompt = n
    ks: tuple[int, ...]
    batch_questions: int


class Evaluator:
    def __init__(self, sets: dict[str, list[PromptedExample]], settings: EvalSettings, *, rollout, grader,
                 tokenizer, info):
        n = settings.sampling.n_samples_per_prompt
        bad = [k for k in settings.ks if not 1 <= k <= n]
        if bad:
            raise ValueError(f"evaluation.ks: {bad} outside 1..samples={n}")
        self.sets, self.s = sets, settings
        self.rollout, self.grader, self.tok, self.info = rollout, grader, tokenizer, info

    def due(self, step: int) -> bool:
        return bool(self.sets) and self.s.every > 0 and step % self.s.every == 0

    @torch.no_grad()
    def run(self, step: int) -> StepMetrics:
        """pass@k per set, averaged over problems (over all ranks once reduced); every rank takes its share
        of the problems."""
        self.rollout.sync_weights(step)
        n = self.s.sampling.n_samples_per_prompt
        m = StepMetrics()
        for name, problems in self.sets.items():
            mine = problems[self.info.rank::self.info.world_size]
            pass_sums, accuracy_sum, reflecting = [0.0] * len(self.s.ks), 0.0, 0
            for start in range(0, len(mine), self.s.batch_questions):
                counts, with_reflection = self._correct_counts(mine[start:start + self.s.batch_questions])
                reflecting += with_reflection
                for correct in counts:
                    for i, k in enumerate(self.s.ks):
                        pass_sums[i] += pass_at_k(n, correct, k)
                    accuracy_sum += correct / n
            for k, total in zip(self.s.ks, pass_sums):
                m.mean(f"eval/{name}/pass@{k}", total, len(mine))
            m.mean(f"eval/{name}/avg@{n}", accuracy_sum, len(mine))
            m.mean(f"eval/{name}/reflection_rate", reflecting, len(mine) * n)
        return m

    def _correct_counts(self, problems: list[PromptedExample]) -> tuple[list[int], int]:
        """Right answers per problem, and how many of all the answers hold a reflection."""
        out = generate(self.rollout, self.tok, [p.prompt_ids for p in problems], self.s.sampling, self.info.device)
        golds = [problems[q].example.answer for q in out.prompt_index]
        graded = self.grader.grade(list(zip(out.texts, golds)), require_box=True)
        counts = [0] * len(problems)
        for q, ok in zip(out.prompt_index, graded.correct):
            counts[q] += int(ok)
        return counts, sum(reflects(t) for t in out.texts)
