"""Prompts in, responses out: the one way the package calls a rollout engine.

Every caller (the RL rollout, TAPO's constructions, evaluation, the prefilter, the cold-start
builder, the constructor probe) left-pads token-id prompts, generates K samples per prompt and reads
back unpadded ids and decoded texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from deepspeed.runtime.rollout.base import RolloutRequest, SamplingConfig

from tapo_ds.batch import left_pad
from tapo_ds.data import encode, render_chat


@dataclass
class Generated:
    """Row ``i`` answers prompt ``prompt_index[i]``; the K rows of a prompt are consecutive."""

    token_ids: list[list[int]] = field(default_factory=list)  # the stop token included when one was sampled
    texts: list[str] = field(default_factory=list)  # decoded without special tokens
    truncated: list[bool] = field(default_factory=list)  # no stop token within max_new_tokens
    prompt_index: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # the rollout engine's, where it reports any

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    def by_prompt(self, n_prompts: int) -> list[list[int]]:
        """The rows of each prompt, in order."""
        rows: list[list[int]] = [[] for _ in range(n_prompts)]
        for row, q in enumerate(self.prompt_index):
            rows[q].append(row)
        return rows


def _request(tokenizer, prompts: Sequence[Sequence[int]], device) -> RolloutRequest:
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return RolloutRequest(ids, mask)


def generate(rollout, tokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
             device=None, lookup=None) -> Generated:
    """One ``rollout.generate`` call over ``prompts`` (token ids without padding); none when there are none.
    ``lookup``: prompt-lookup drafts (:mod:`tapo_ds.lookup_draft`), for a rollout that ``takes_lookup``."""
    if not prompts:
        return Generated()
    request = _request(tokenizer, prompts, device)
    res = rollout.generate(request, sampling) if lookup is None else rollout.generate(request, sampling, lookup)
    return _generated(res, tokenizer, sampling)


def generate_with_followups(rollout, tokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, follow,
                            device=None):
    """One decode of ``prompts`` that also runs the follow-up rows ``follow`` asks for (``TapoRollout``'s
    ``generate_with_followups``). The request's samples reach the caller through ``follow.group_done``, so
    they are not decoded again here; returns the follow-ups' ``FollowUpResult``."""
    _, extra = rollout.generate_with_followups(_request(tokenizer, prompts, device), sampling, follow)
    return extra


def _generated(res, tokenizer, sampling: SamplingConfig) -> Generated:
    if hasattr(res, "response_lengths"):  # tapo-ds's RolloutResult
        token_ids = [res.response_ids[i, :n].tolist() for i, n in enumerate(res.response_lengths.tolist())]
        truncated = [bool(t) for t in res.truncated.tolist()]
        prompt_index = [int(q) for q in res.prompt_index.tolist()]
    else:  # DeepSpeed's plain RolloutBatch (HybridEngineRollout)
        token_ids, truncated, prompt_index = _from_rollout_batch(res, tokenizer.eos_token_id,
                                                                 sampling.n_samples_per_prompt)
    return Generated(token_ids=token_ids,
                     texts=[tokenizer.decode(t, skip_special_tokens=True) for t in token_ids],
                     truncated=truncated, prompt_index=prompt_index, stats=dict(getattr(res, "stats", None) or {}))


def _from_rollout_batch(res, eos_token_id: int, k: int) -> tuple[list[list[int]], list[bool], list[int]]:
    """Responses of a ``RolloutBatch``: the attended tokens from ``response_start_idx`` on (through the
    first EOS); truncated when no EOS was sampled; rows ``repeat_interleave`` the prompts K times."""
    token_ids, truncated = [], []
    for row in range(res.batch_size):
        start = int(res.response_start_idx[row])
        ids = res.input_ids[row, start:][res.attention_mask[row, start:].bool()].tolist()
        token_ids.append(ids)
        truncated.append(eos_token_id not in ids)
    return token_ids, truncated, [row // k for row in range(res.batch_size)]


def chat_texts(rollout, tokenizer, contents: Sequence[str], sampling: SamplingConfig, chat_template_kwargs: dict,
               device=None, batch: int = 64) -> list[str]:
    """One text per user-message content (rendered with the chat template), ``batch`` prompts per call."""
    texts: list[str] = []
    for start in range(0, len(contents), batch):
        prompts = [encode(tokenizer, render_chat(tokenizer, c, chat_template_kwargs))
                   for c in contents[start:start + batch]]
        texts += generate(rollout, tokenizer, prompts, sampling, device).texts
    return texts
