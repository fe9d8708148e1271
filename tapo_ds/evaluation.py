"""In-training evaluation: held-out problems every N steps, pass@k logged as ``eval/<set>/pass@k``.

Same rollout engine and grader as training, the evaluation protocol's sampling (docs/method.md §Evaluation:
temperature 0.6, top-p 0.9, n samples per problem) and the unbiased pass@k estimator of
``eval.metrics`` — one definition for the trainer and the lm-eval tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.runtime.rollout.base import RolloutRequest, SamplingConfig

from eval.metrics import pass_at_k
from tapo_ds.batch import left_pad
from tapo_ds.data import PromptedExample
from tapo_ds.engine import all_reduce_


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
    def run(self, step: int) -> dict[str, float]:
        """pass@k per set, averaged over problems; every rank takes its share of the problems."""
        self.rollout.sync_weights(step)
        metrics: dict[str, float] = {}
        for name, problems in self.sets.items():
            mine = problems[self.info.rank::self.info.world_size]
            sums = torch.zeros(len(self.s.ks) + 2, dtype=torch.float64, device=self.info.device)
            for start in range(0, len(mine), self.s.batch_questions):
                chunk = mine[start:start + self.s.batch_questions]
                for correct in self._correct_counts(chunk):
                    n = self.s.sampling.n_samples_per_prompt
                    sums[:len(self.s.ks)] += torch.tensor([pass_at_k(n, correct, k) for k in self.s.ks],
                                                          dtype=torch.float64, device=sums.device)
                    sums[-2] += correct / n
                    sums[-1] += 1
            all_reduce_(sums, "sum")
            count = max(float(sums[-1]), 1.0)
            for i, k in enumerate(self.s.ks):
                metrics[f"eval/{name}/pass@{k}"] = float(sums[i]) / count
            metrics[f"eval/{name}/avg@{self.s.sampling.n_samples_per_prompt}"] = float(sums[-2]) / count
        return metrics

    def _correct_counts(self, problems: list[PromptedExample]) -> list[int]:
        ids, mask = left_pad([p.prompt_ids for p in problems], self.tok.pad_token_id)
        res = self.rollout.generate(RolloutRequest(ids.to(self.info.device), mask.to(self.info.device)),
                                    self.s.sampling)
        texts = [self.tok.decode(res.response_ids[i, :n].tolist(), skip_special_tokens=True)
                 for i, n in enumerate(res.response_lengths.tolist())]
        golds = [problems[int(q)].example.answer for q in res.prompt_index.tolist()]
        graded = self.grader.grade(list(zip(texts, golds)), require_box=True)
        counts = [0] * len(problems)
        for q, ok in zip(res.prompt_index.tolist(), graded.correct):
            counts[int(q)] += int(ok)
        return counts
