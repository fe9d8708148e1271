"""The decode loop of :class:`tapo_ds.rollout.TapoRollout`: KV-cache sampling that does no work for
finished rows and, when asked, refills their slots with follow-up rows.

Rows of the batch map to *slots* (a sample's place in the output). The request's B x K samples take
slots 0..BK-1; follow-up rows take the next ones in the order they join. Finished rows stay in the
batch until at least ``compact_fraction`` of it has finished, then leave it together (each leaving
copies the KV cache, so waiting for a few amortises the copy). Follow-up rows are prefilled on their
own and joined to the running cache (:mod:`tapo_ds.kv_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
from deepspeed.runtime.rollout.base import RolloutRequest, SamplingConfig
from transformers import DynamicCache

from tapo_ds import kv_rows


def sample_next_token(logits: torch.Tensor, sampling: SamplingConfig,
                      generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row from float logits ``[n, V]``: greedy when temperature <= 0, else
    temperature -> top-k -> top-p (the order HF's logits warpers apply them)."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - sampling.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class FollowUps(Protocol):
    """The caller's side of a decode with follow-up rows."""

    sampling: SamplingConfig  # of the follow-up rows (n_samples_per_prompt is ignored: one row each)

    def group_done(self, prompt: int, token_ids: list[list[int]], truncated: list[bool]) -> None:
        """The K samples of request row ``prompt`` have all ended (stop token included where sampled)."""

    def ready(self, block: bool) -> list[list[int]]:
        """Prompts (token ids, unpadded) to start now. ``block``: nothing else is running, so wait for
        the work still pending; an empty answer then ends the decode."""


@dataclass
class FollowUpResult:
    token_ids: list[list[int]] = field(default_factory=list)  # per follow-up row, in the order they joined
    truncated: list[bool] = field(default_factory=list)
    joins: int = 0  # times rows joined a running batch


def _same_sampling(a: SamplingConfig, b: SamplingConfig) -> bool:
    return (a.temperature, a.top_p, a.top_k) == (b.temperature, b.top_p, b.top_k)


class _DecodeLoop:
    def __init__(self, module, stop_token_ids: list[int], pad_token_id: int, compact_fraction: float,
                 sampling: SamplingConfig, follow: Optional[FollowUps], generator, lockstep):
        self.module, self.pad, self.compact_fraction = module, pad_token_id, compact_fraction
        self._stop_ids = torch.tensor(stop_token_ids, dtype=torch.long)
        self.sampling, self.follow, self.generator, self.lockstep = sampling, follow, generator, lockstep
        self.samplings = [sampling] if follow is None else [sampling, follow.sampling]
        self.counters = {"decode_steps": 0, "row_steps": 0, "compactions": 0}
        self.joins = 0

    # ------------------------------------------------------------------ slots

    def _new_slots(self, n: int, limit: int, kind: int, prompt: int) -> torch.Tensor:
        """Append ``n`` empty slots; returns their indices."""
        device = self.out.device
        first = self.out.shape[0]
        width = max(self.out.shape[1], limit)
        if width > self.out.shape[1]:
            self.out = torch.cat([self.out, self.out.new_full((first, width - self.out.shape[1]), self.pad)], dim=1)
        self.out = torch.cat([self.out, self.out.new_full((n, width), self.pad)])
        self.gen = torch.cat([self.gen, self.gen.new_zeros(n)])
        self.stopped = torch.cat([self.stopped, self.stopped.new_zeros(n)])
        self.limit = torch.cat([self.limit, self.limit.new_full((n,), limit)])
        self.kind = torch.cat([self.kind, self.kind.new_full((n,), kind)])
        self.slot_prompt = torch.cat([self.slot_prompt, self.slot_prompt.new_full((n,), prompt)])
        return torch.arange(first, first + n, device=device)

    # ------------------------------------------------------------------ rows

    def _prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeat: int):
        """Cache, last logits, mask and next positions of left-padded prompts, each repeated ``repeat``
        times (the K samples share one prefill). Positions from the mask, as HF generate computes them."""
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.module.config)
        logits = self.module(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        attn, next_pos = prompt_mask, positions[:, -1] + 1
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)
            logits, attn, next_pos = (t.repeat_interleave(repeat, dim=0) for t in (logits, attn, next_pos))
        return cache, logits, attn, next_pos

    def _join(self, prompts: list[list[int]]) -> None:
        """Follow-up rows into the batch (or as the batch, when it is empty)."""
        device = self.out.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            mask[i, width - len(p):] = 1
        cache, logits, attn, next_pos = self._prefill(ids, mask, 1)
        slots = self._new_slots(len(prompts), self.follow.sampling.max_new_tokens, kind=1, prompt=-1)
        self.followup_slots += slots.tolist()
        if len(self.rows) == 0:
            self.cache, self.attn = cache, attn
            self.logits, self.next_pos, self.rows = logits, next_pos, slots
            self.done = torch.zeros(len(slots), dtype=torch.bool, device=device)
            return
        self.cache, self.attn = kv_rows.join(self.cache, self.attn, cache, attn)
        self.logits = torch.cat([self.logits, logits])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.rows = torch.cat([self.rows, slots])
        self.done = torch.cat([self.done, torch.zeros(len(slots), dtype=torch.bool, device=device)])
        self.joins += 1

    def _sample(self) -> torch.Tensor:
        if len(self.samplings) == 1 or _same_sampling(*self.samplings):
            return sample_next_token(self.logits.float(), self.sampling, self.generator)
        token = torch.empty(len(self.rows), dtype=torch.long, device=self.logits.device)
        kinds = self.kind[self.rows]
        for k, s in enumerate(self.samplings):
            sel = (kinds == k).nonzero().squeeze(1)
            if sel.numel():
                token[sel] = sample_next_token(self.logits[sel].float(), s, self.generator)
        return token

    def _finished_groups(self, hit: torch.Tensor) -> None:
        """Tell the caller about request rows whose K samples have all ended."""
        ended = self.rows[hit]
        ended = ended[self.kind[ended] == 0]
        for q in self.slot_prompt[ended].tolist():
            self.remaining[q] -= 1
            if self.remaining[q] == 0:
                slots = range(q * self.K, (q + 1) * self.K)
                lengths = self.gen[q * self.K:(q + 1) * self.K].tolist()
                self.follow.group_done(q, [self.out[s, :n].tolist() for s, n in zip(slots, lengths)],
                                       [not bool(self.stopped[s]) for s in slots])

    # ------------------------------------------------------------------ the loop

    def run(self, request: RolloutRequest) -> None:
        prompt_ids, prompt_mask = request.prompt_ids, request.prompt_attention_mask.long()
        device = prompt_ids.device
        B, K, T = prompt_ids.shape[0], self.sampling.n_samples_per_prompt, self.sampling.max_new_tokens
        self.K, self.remaining = K, [K] * B
        self.out = torch.full((0, T), self.pad, dtype=torch.long, device=device)
        self.gen = torch.zeros(0, dtype=torch.long, device=device)  # tokens generated per slot
        self.stopped = torch.zeros(0, dtype=torch.bool, device=device)
        self.limit = torch.zeros(0, dtype=torch.long, device=device)
        self.kind = torch.zeros(0, dtype=torch.long, device=device)  # 0: request sample, 1: follow-up
        self.slot_prompt = torch.zeros(0, dtype=torch.long, device=device)
        self.followup_slots: list[int] = []
        self.rows = self._new_slots(B * K, T, kind=0, prompt=0)  # batch row -> slot
        self.slot_prompt[:] = torch.arange(B, device=device).repeat_interleave(K)
        self.cache, self.logits, self.attn, self.next_pos = self._prefill(prompt_ids, prompt_mask, K)
        self.done = torch.zeros(B * K, dtype=torch.bool, device=device)  # per batch row
        stop_ids = self._stop_ids.to(device)
        follow = self.follow
        while True:
            if follow is not None:
                new = follow.ready(block=False)
                if new:
                    self._join(new)
            token = self._sample()
            live = ~self.done
            slots = self.rows[live]
            self.out[slots, self.gen[slots]] = token[live]
            self.gen[slots] += 1
            is_stop = torch.isin(token, stop_ids) & live
            hit = (is_stop | (self.gen[self.rows] >= self.limit[self.rows])) & live
            self.stopped[self.rows[is_stop]] = True
            self.done |= hit
            if follow is not None and bool(hit.any()):
                self._finished_groups(hit)
            running = not bool(self.done.all())
            if self.lockstep is not None:  # stop only when no rank has a live row
                flag = torch.tensor([int(running)], device=device)
                self.lockstep.all_reduce(flag, op=self.lockstep.ReduceOp.MAX)
                running = bool(flag.item())
            if not running:
                new = follow.ready(block=True) if follow is not None else []
                if not new:
                    break
                self.rows = self.rows[:0]
                self._join(new)
                continue
            n_done = int(self.done.sum())
            if n_done and n_done >= self.compact_fraction * len(self.rows) and len(self.rows) > 1:
                keep = (~self.done).nonzero().squeeze(1)
                if keep.numel() == 0:  # lockstep: this rank has finished; step one dummy row
                    keep = keep.new_zeros(1)
                self.cache.batch_select_indices(keep)
                self.rows, self.done, token = self.rows[keep], self.done[keep], token[keep]
                self.attn, self.next_pos = self.attn[keep], self.next_pos[keep]
                self.counters["compactions"] += 1
            self.attn = torch.cat([self.attn, self.attn.new_ones(len(self.rows), 1)], dim=1)
            self.logits = self.module(input_ids=token[:, None], attention_mask=self.attn,
                                      position_ids=self.next_pos[:, None], past_key_values=self.cache,
                                      use_cache=True).logits[:, -1]
            self.next_pos = self.next_pos + 1
            self.counters["decode_steps"] += 1
            self.counters["row_steps"] += len(self.rows)

    def followup_result(self) -> FollowUpResult:
        slots = self.followup_slots
        return FollowUpResult(token_ids=[self.out[s, :int(self.gen[s])].tolist() for s in slots],
                              truncated=[not bool(self.stopped[s]) for s in slots], joins=self.joins)
