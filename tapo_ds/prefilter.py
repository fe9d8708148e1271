"""The pass-rate prefilter (docs/method.md §Prefilter): K samples per question with a checkpoint, keep the
questions whose pass rate lies in [low, high], write them, print the histogram.

DCS only fires on questions the model sometimes solves; this stage spends RL steps there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from deepspeed.runtime.rollout.base import SamplingConfig

from tapo_ds.data import PromptedExample
from tapo_ds.generation import generate


@dataclass
class PrefilterResult:
    correct: list[int]  # per question, aligned with the input
    samples: int

    def keep(self, low: float, high: float) -> list[int]:
        # A small tolerance so that 1/8 = 0.125 sits inside [0.125, 0.875] despite float rounding.
        return [i for i, c in enumerate(self.correct) if low - 1e-9 <= c / self.samples <= high + 1e-9]

    def histogram(self) -> list[int]:
        counts = [0] * (self.samples + 1)
        for c in self.correct:
            counts[c] += 1
        return counts

    def render(self, low: float, high: float) -> str:
        hist, total = self.histogram(), max(len(self.correct), 1)
        width = max(hist) or 1
        lines = [f"pass-rate histogram ({len(self.correct)} questions x {self.samples} samples):"]
        for c, n in enumerate(hist):
            inside = "*" if low - 1e-9 <= c / self.samples <= high + 1e-9 else " "
            lines.append(f"  {c:>3}/{self.samples} {inside} {n:>6} {100 * n / total:5.1f}%  {'#' * round(40 * n / width)}")
        kept = len(self.keep(low, high))
        lines.append(f"kept {kept} of {len(self.correct)} ({100 * kept / total:.1f}%) with pass rate in "
                     f"[{low}, {high}] (rows marked *)")
        return "\n".join(lines)


def sample_and_grade(questions: Sequence[PromptedExample], *, rollout, grader, tokenizer, sampling: SamplingConfig,
                     batch_questions: int, device) -> tuple[list[list[str]], list[list[float]]]:
    """K responses per question and their binary rewards (last box, as in training)."""
    texts_out: list[list[str]] = []
    rewards_out: list[list[float]] = []
    for start in range(0, len(questions), batch_questions):
        chunk = questions[start:start + batch_questions]
        out = generate(rollout, tokenizer, [q.prompt_ids for q in chunk], sampling, device)
        graded = grader.grade([(t, chunk[q].example.answer) for t, q in zip(out.texts, out.prompt_index)],
                              require_box=True)
        for rows in out.by_prompt(len(chunk)):
            texts_out.append([out.texts[i] for i in rows])
            rewards_out.append([float(graded.correct[i]) for i in rows])
    return texts_out, rewards_out


def count_correct(questions: Sequence[PromptedExample], **kwargs) -> list[int]:
    """Correct samples out of ``sampling.n_samples_per_prompt`` for each question."""
    return [int(sum(r)) for r in sample_and_grade(questions, **kwargs)[1]]


def write_filtered(path: Path, questions: Sequence[PromptedExample], result: PrefilterResult, keep: list[int],
                   problem_field: str, answer_field: str, solution_field: str = "") -> None:
    """The kept rows (with their reference solution under ``solution_field`` where they have one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for i in keep:
            ex = questions[i].example
            row = {problem_field: ex.problem, answer_field: ex.answer}
            if solution_field and ex.solution:
                row[solution_field] = ex.solution
            row.update(pass_rate=result.correct[i] / result.samples, source=ex.source)
            fh.write(json.dumps(row) + "\n")


def gather_counts(local: list[int], rank: int, world: int) -> list[int]:
    """Rank r holds questions r, r+world, ...: interleave them back into the input order."""
    if world == 1:
        return local
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, local)
    total = sum(len(p) for p in parts)
    out = [0] * total
    for r, part in enumerate(parts):
        out[r::world] = part
    return out
