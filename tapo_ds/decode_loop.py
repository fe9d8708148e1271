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

from tapo_ds import kv_rows, lookup_draft
from tapo_ds.growing_cache import growing_cache
from tapo_ds.lookup_draft import NO_TOKEN, LookupDraft


def warp(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Float logits ``[n, V]`` of the sampling distribution (temperature > 0): temperature -> top-k -> top-p
    (the order HF's logits warpers apply them), dropped tokens at -inf."""
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
    return logits


def sample_next_token(logits: torch.Tensor, sampling: SamplingConfig,
                      generator: Optional[torch.Generator], exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row from float logits ``[n, V]``: greedy when temperature <= 0, else from the warped
    distribution (:func:`warp`). ``exclude`` ``[n]``: a token per row to leave out of it, renormalised
    (a rejected draft token, :mod:`tapo_ds.lookup_draft`; ``NO_TOKEN``: none)."""
    if sampling.temperature <= 0:
        if exclude is not None:
            logits = _without(logits, exclude)
        return logits.argmax(dim=-1)
    logits = warp(logits, sampling)
    if exclude is not None:
        logits = _without(logits, exclude)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def draft_probs(sampling: SamplingConfig, logits: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """The probability of each draft token under the sampling distribution at its position: logits
    ``[n, D, V]``, draft ``[n, D]`` (``NO_TOKEN`` allowed) -> ``[n, D]``; at temperature 0, 1.0 where the
    draft token is the argmax, else 0.0."""
    n, D, V = logits.shape
    idx = draft.clamp(min=0)[..., None]
    if sampling.temperature <= 0:
        return (logits.argmax(-1) == draft).float()
    probs = warp(logits.reshape(n * D, V).float(), sampling).softmax(-1).reshape(n, D, V)
    return probs.gather(2, idx).squeeze(2).masked_fill(draft < 0, 0.0)


def _without(logits: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    rows = (exclude >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return logits
    logits = logits.clone()
    logits[rows, exclude[rows]] = float("-inf")
    return logits


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
    draft_tokens: int = 0  # prompt-lookup draft tokens proposed to the follow-up rows, and kept
    draft_accepted: int = 0


def _right_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[1] >= width:
        return t
    return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), NO_TOKEN)], dim=1)


def _same_sampling(a: SamplingConfig, b: SamplingConfig) -> bool:
    return (a.temperature, a.top_p, a.top_k) == (b.temperature, b.top_p, b.top_k)


class _DecodeLoop:
    def __init__(self, module, stop_token_ids: list[int], pad_token_id: int, compact_fraction: float,
                 sampling: SamplingConfig, follow: Optional[FollowUps], generator, lockstep,
                 lookup: Optional[LookupDraft] = None, lookup_kinds: tuple[int, ...] = (0,)):
        self.module, self.pad, self.compact_fraction = module, pad_token_id, compact_fraction
        self._stop_ids = torch.tensor(stop_token_ids, dtype=torch.long)
        self.sampling, self.follow, self.generator, self.lockstep = sampling, follow, generator, lockstep
        self.samplings = [sampling] if follow is None else [sampling, follow.sampling]
        self.lookup = lookup if lookup is not None and lookup.on else None
        self.lookup_kinds = tuple(lookup_kinds)
        self.counters = {"decode_steps": 0, "row_steps": 0, "compactions": 0, "draft_tokens": 0,
                         "draft_accepted": 0}
        self.joins = 0

    # ------------------------------------------------------------------ slots

    def _new_slots(self, n: int, limit: int, kind: int, prompt: int, source) -> torch.Tensor:
        """Append ``n`` empty slots (``source()``: their prompts, ``NO_TOKEN`` padded, kept only for drafts);
        returns their indices."""
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
        if self.lookup is not None:
            new = source()
            S = max(self.src.shape[1], new.shape[1])
            self.src = torch.cat([_right_pad(self.src, S), _right_pad(new, S)])
        return torch.arange(first, first + n, device=device)

    # ------------------------------------------------------------------ rows

    def _prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeat: int):
        """Cache, last logits, mask and next positions of left-padded prompts, each repeated ``repeat``
        times (the K samples share one prefill). Positions from the mask, as HF generate computes them."""
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        cache = growing_cache(self.module.config)
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
        slots = self._new_slots(len(prompts), self.follow.sampling.max_new_tokens, kind=1, prompt=-1,
                                source=lambda: ids.masked_fill(mask == 0, NO_TOKEN))
        self.followup_slots += slots.tolist()
        fresh = torch.full((len(slots),), NO_TOKEN, dtype=torch.long, device=device)
        if len(self.rows) == 0:
            self.cache, self.attn = cache, attn
            self.logits, self.next_pos, self.rows, self.exclude = logits, next_pos, slots, fresh
            self.done = torch.zeros(len(slots), dtype=torch.bool, device=device)
            return
        self.cache, self.attn = kv_rows.join(self.cache, self.attn, cache, attn)
        self.logits = torch.cat([self.logits, logits])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.rows = torch.cat([self.rows, slots])
        self.exclude = torch.cat([self.exclude, fresh])
        self.done = torch.cat([self.done, torch.zeros(len(slots), dtype=torch.bool, device=device)])
        self.joins += 1

    def _by_kind(self, fn, n: int, dtype, *tensors):
        """``fn(sampling, *rows_of_tensors)`` per sampling kind of the batch rows, gathered into ``[n, ...]``."""
        if len(self.samplings) == 1 or _same_sampling(*self.samplings):
            return fn(self.sampling, *tensors)
        kinds = self.kind[self.rows]
        out = None
        for k, s in enumerate(self.samplings):
            sel = (kinds == k).nonzero().squeeze(1)
            if sel.numel():
                part = fn(s, *(t[sel] for t in tensors))
                if out is None:
                    out = part.new_zeros((n,) + tuple(part.shape[1:]), dtype=dtype)
                out[sel] = part
        return out

    def _sample(self) -> torch.Tensor:
        exclude = None
        if self.lookup is not None:  # a draft token rejected at the last forward is left out
            exclude, self.exclude = self.exclude, torch.full_like(self.exclude, NO_TOKEN)
        if exclude is None:
            return self._by_kind(lambda s, logits: sample_next_token(logits.float(), s, self.generator),
                                 len(self.rows), torch.long, self.logits)
        return self._by_kind(lambda s, logits, ex: sample_next_token(logits.float(), s, self.generator, ex),
                             len(self.rows), torch.long, self.logits, exclude)

    def _emit(self, tokens: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Write the first ``count`` of ``tokens`` ``[n, W]`` for each live batch row, each row up to its stop
        token or token limit; returns the rows that ended."""
        live = ~self.done
        ended = torch.zeros_like(live)
        for j in range(tokens.shape[1]):
            take = live & (count > j)
            if j and not bool(take.any()):
                break
            slots = self.rows[take]
            tok = tokens[take, j]
            self.out[slots, self.gen[slots]] = tok
            self.gen[slots] += 1
            is_stop = torch.isin(tok, self._stop_ids)
            self.stopped[slots[is_stop]] = True
            hit = torch.zeros_like(live)
            hit[take] = is_stop | (self.gen[slots] >= self.limit[slots])
            ended |= hit
            live &= ~hit
        self.done |= ended
        if self.follow is not None and bool(ended.any()):
            self._finished_groups(ended)
        return ended

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

    def _propose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's drafts of the batch rows (:mod:`tapo_ds.lookup_draft`), ``[n, D]`` and ``[n]``."""
        rows, cfg = self.rows, self.lookup
        room = (self.limit[rows] - self.gen[rows]) * (~self.done)
        room = room * torch.isin(self.kind[rows], self._lookup_kinds)
        history = lookup_draft.history_of(self.out, rows, self.gen[rows], cfg.max_match)
        return lookup_draft.propose(self.src[rows], history, room, cfg)

    def _forward(self, token: torch.Tensor) -> None:
        """One forward over each row's sampled token and its draft; keeps what verification accepts."""
        n = len(self.rows)
        draft, count = self._propose() if self.lookup is not None else (None, None)
        D = int(count.max()) if count is not None and n else 0
        chunk = token[:, None]
        if D:
            draft = draft[:, :D]
            chunk = torch.cat([chunk, draft.masked_fill(draft < 0, self.pad)], dim=1)
        width = 1 + D
        self.attn = torch.cat([self.attn, self.attn.new_ones(n, width)], dim=1)
        positions = self.next_pos[:, None] + torch.arange(width, device=token.device)[None, :]
        logits = self.module(input_ids=chunk, attention_mask=self.attn, position_ids=positions,
                             past_key_values=self.cache, use_cache=True).logits
        self.counters["decode_steps"] += 1
        self.counters["row_steps"] += n
        if not D:
            self.logits = logits[:, -1]
            self.next_pos = self.next_pos + 1
            return
        probs = self._by_kind(draft_probs, n, torch.float, logits[:, :D], draft)
        greedy = self._by_kind(lambda s, d: torch.full((len(d),), s.temperature <= 0, device=d.device), n,
                               torch.bool, draft)
        kept = lookup_draft.accepted(probs, count, self.generator, greedy)
        self._emit(draft, kept)
        arange = torch.arange(n, device=token.device)
        self.logits = logits[arange, kept]
        rejected = draft[arange, kept.clamp(max=D - 1)]
        self.exclude = torch.where(kept < count, rejected, torch.full_like(rejected, NO_TOKEN))
        self.attn[:, -width:] = (torch.arange(width, device=token.device)[None, :] <= kept[:, None]).long()
        self.next_pos = self.next_pos + 1 + kept
        self.counters["draft_tokens"] += int(count.sum())
        self.counters["draft_accepted"] += int(kept.sum())

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
        self.src = torch.zeros((0, 0), dtype=torch.long, device=device)  # per slot: its prompt, to copy from
        self.followup_slots: list[int] = []
        self.rows = self._new_slots(  # batch row -> slot
            B * K, T, kind=0, prompt=0,
            source=lambda: prompt_ids.masked_fill(prompt_mask == 0, NO_TOKEN).repeat_interleave(K, dim=0))
        self.slot_prompt[:] = torch.arange(B, device=device).repeat_interleave(K)
        self.cache, self.logits, self.attn, self.next_pos = self._prefill(prompt_ids, prompt_mask, K)
        self.done = torch.zeros(B * K, dtype=torch.bool, device=device)  # per batch row
        self.exclude = torch.full((B * K,), NO_TOKEN, dtype=torch.long, device=device)
        self._stop_ids = self._stop_ids.to(device)
        self._lookup_kinds = torch.tensor(self.lookup_kinds, device=device)
        follow = self.follow
        while True:
            if follow is not None:
                new = follow.ready(block=False)
                if new:
                    self._join(new)
            token = self._sample()
            self._emit(token[:, None], torch.ones_like(token))
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
                self.attn, self.next_pos, self.exclude = self.attn[keep], self.next_pos[keep], self.exclude[keep]
                self.counters["compactions"] += 1
            self._forward(token)

    def followup_result(self) -> FollowUpResult:
        slots = self.followup_slots
        return FollowUpResult(token_ids=[self.out[s, :int(self.gen[s])].tolist() for s in slots],
                              truncated=[not bool(self.stopped[s]) for s in slots], joins=self.joins,
                              draft_tokens=self.counters["draft_tokens"] if 1 in self.lookup_kinds else 0,
                              draft_accepted=self.counters["draft_accepted"] if 1 in self.lookup_kinds else 0)
