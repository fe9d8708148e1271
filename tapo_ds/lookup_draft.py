"""Prompt-lookup drafts: decoding text that copies its prompt in a few forwards instead of one per token.

A construction copies a lot: the wrong answer y⁻ word for word up to its first mistake, and often the
right answer's steps after the reflection; both are in its prompt. So at each decode step a row looks
up the longest suffix of what it has written so far (at least ``min_match`` tokens) in its prompt and
proposes the ``tokens`` tokens that follow there as a draft. One forward scores the sampled token and
the draft together; the draft is verified by speculative sampling against a point-mass proposal:

* draft token ``d`` is accepted with probability ``p(d)``, where ``p`` is the row's sampling
  distribution at that position (temperature, top-k, top-p applied); at temperature 0, iff ``d``
  is the argmax;
* at the first rejection the next token is drawn from ``p`` without ``d``, renormalised
  (``(p - q)+`` for ``q`` the point mass on ``d``); when every draft token is accepted the next token is
  drawn from ``p`` at the position after the draft.

Each emitted token is then distributed exactly as in token-by-token sampling (the acceptance test of
Leviathan et al. 2023 and Chen et al. 2023, specialised to a deterministic draft): the method is
unchanged, only the number of sequential forwards. The rows' draft lengths differ, so a forward
carries ``1 + longest draft`` positions for every row; positions a row did not keep stay in the KV
cache with attention mask 0 (``position_ids`` travel with the row, so the holes change no result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_TOKEN = -1  # padding of the lookup tensors; never a token id


@dataclass(frozen=True)
class LookupDraft:
    """``tokens``: the longest draft per row and forward (0: off); ``min_match``: the shortest suffix of
    the written text that must recur in the prompt; ``max_match``: the longest suffix compared (the
    occurrence with the longest match wins; among equals, the last one)."""

    tokens: int = 8
    min_match: int = 4
    max_match: int = 16

    def __post_init__(self):
        if self.tokens < 0:
            raise ValueError(f"lookup draft tokens: expected >= 0, got {self.tokens}")
        if not 1 <= self.min_match <= self.max_match:
            raise ValueError(f"lookup draft: expected 1 <= min_match <= max_match, got {self.min_match}, "
                             f"{self.max_match}")

    @property
    def on(self) -> bool:
        return self.tokens > 0


def propose(source: torch.Tensor, history: torch.Tensor, room: torch.Tensor,
            cfg: LookupDraft) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts ``[n, cfg.tokens]`` and their lengths ``[n]``.

    ``source``: ``[n, S]`` token ids to copy from (``NO_TOKEN`` where there is none, e.g. padding);
    ``history``: ``[n, cfg.max_match]`` the last tokens written, right-aligned (``NO_TOKEN`` before the
    first); ``room``: ``[n]`` how many draft tokens each row may take (0: none)."""
    n, S = source.shape
    M, D = cfg.max_match, cfg.tokens
    device = source.device
    # window s holds the M tokens before source position s (s = 0..S); a draft starts at s
    padded = torch.cat([source.new_full((n, M), -2), source, source.new_full((n, D), NO_TOKEN)], dim=1)
    windows = padded[:, :S + M].unfold(1, M, 1)  # [n, S + 1, M]
    eq = (windows == history[:, None, :]) & (history[:, None, :] >= 0)
    match = eq.flip(-1).long().cumprod(-1).sum(-1)  # length of the common suffix, [n, S + 1]
    match[:, S] = 0  # nothing follows the end of the source
    # the longest match, the last one among equals
    best = match.flip(-1).argmax(-1)
    start = S - best
    length = match.gather(1, start[:, None]).squeeze(1)
    idx = (start[:, None] + M + torch.arange(D, device=device)[None, :])
    draft = padded.gather(1, idx)
    count = (draft >= 0).long().cumprod(-1).sum(-1)
    count = torch.minimum(count, room.clamp(min=0))
    count = torch.where(length >= cfg.min_match, count, torch.zeros_like(count))
    draft = torch.where(torch.arange(D, device=device)[None, :] < count[:, None], draft,
                        torch.full_like(draft, NO_TOKEN))
    return draft, count


def history_of(out: torch.Tensor, rows: torch.Tensor, gen: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` tokens written in rows ``rows`` of ``out`` (``gen``: how many each), right-aligned."""
    idx = gen[:, None] - width + torch.arange(width, device=out.device)[None, :]
    hist = out[rows[:, None], idx.clamp(min=0)]
    return hist.masked_fill(idx < 0, NO_TOKEN)


def accepted(probs_at_draft: torch.Tensor, count: torch.Tensor, generator, greedy: torch.Tensor) -> torch.Tensor:
    """How many leading draft tokens each row keeps, ``[n]``.

    ``probs_at_draft``: ``[n, D]`` the sampling probability of each draft token at its position (for
    greedy rows: 1.0 where it is the argmax, else 0.0); ``count``: the drafts' lengths; ``greedy``:
    ``[n]`` bool."""
    n, D = probs_at_draft.shape
    if bool(greedy.all()):
        ok = probs_at_draft > 0.5
    else:
        u = torch.rand((n, D), generator=generator, device=probs_at_draft.device)
        ok = torch.where(greedy[:, None], probs_at_draft > 0.5, u < probs_at_draft)
    ok &= torch.arange(D, device=ok.device)[None, :] < count[:, None]
    return ok.long().cumprod(-1).sum(-1)
