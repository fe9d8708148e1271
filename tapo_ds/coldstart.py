"""The cold-start data builder as a stage: sample K answers per question with a model, pair
wrong and right answers as TAPO does, construct (with a model or the synthetic task's rule
constructor), keep what verifies, write SFT-format and IFT-format files (docs/method.md §Cold start).

The pure core is ``tapo_ds.synthetic.coldstart.build_coldstart``, which asks its constructor
one pair at a time; a model constructs far faster in one batch, so the model path runs the
core twice with the same seed: once to learn the pairs, once to read the batched outputs.
"""

from __future__ import annotations

from typing import Callable, Sequence

from deepspeed.runtime.rollout.base import RolloutRequest, SamplingConfig

from tapo_ds.batch import left_pad
from tapo_ds.data import encode, render_chat
from tapo_ds.synthetic.coldstart import build_coldstart, pool_grader
from tapo_ds.trajectory import render_construction_prompt


class BatchedModelConstructor:
    """A ``(question, wrong, right) -> str`` constructor backed by one batched generate call."""

    def __init__(self, *, rollout, tokenizer, template: str, sampling: SamplingConfig, chat_template_kwargs: dict,
                 device, batch: int = 64):
        self.rollout, self.tok, self.template = rollout, tokenizer, template
        self.sampling, self.kwargs, self.device, self.batch = sampling, chat_template_kwargs, device, batch
        self.requests: list[tuple[str, str, str]] = []
        self.outputs: dict[tuple[str, str, str], str] = {}

    def record(self, question: str, wrong: str, right: str) -> None:
        self.requests.append((question, wrong, right))
        return None  # nothing constructed in the recording pass

    def generate_all(self) -> None:
        todo = list(dict.fromkeys(self.requests))
        for start in range(0, len(todo), self.batch):
            chunk = todo[start:start + self.batch]
            prompts = [encode(self.tok, render_chat(self.tok, render_construction_prompt(q, w, r, self.template),
                                                    self.kwargs)) for q, w, r in chunk]
            ids, mask = left_pad(prompts, self.tok.pad_token_id)
            res = self.rollout.generate(RolloutRequest(ids.to(self.device), mask.to(self.device)), self.sampling)
            for key, row, n in zip(chunk, range(len(chunk)), res.response_lengths.tolist()):
                self.outputs[key] = self.tok.decode(res.response_ids[row, :n].tolist(), skip_special_tokens=True)

    def __call__(self, question: str, wrong: str, right: str) -> str | None:
        return self.outputs.get((question, wrong, right))


def build_with_model(*, questions: Sequence[str], answers: Sequence[str], responses, rewards,
                     constructor: BatchedModelConstructor, grader_pool, build_kwargs: dict):
    build_coldstart(questions, answers, responses, rewards, constructor.record, pool_grader(grader_pool),
                    **build_kwargs)
    constructor.generate_all()
    return build_coldstart(questions, answers, responses, rewards, constructor, pool_grader(grader_pool),
                           **build_kwargs)


def build_with_rule(*, questions, answers, responses, rewards, rule: Callable, grader_pool, build_kwargs: dict):
    return build_coldstart(questions, answers, responses, rewards, rule, pool_grader(grader_pool), **build_kwargs)
