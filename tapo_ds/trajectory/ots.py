"""OOD Token Suppression (docs/method.md §OTS): per-token weights for constructed samples.

    s_t = log p(y_t | x, y_<t) + H[p(. | x, y_<t)],   w_t = clamp(exp(s_t), w_min, w_max)

from the pre-update policy, entropy over the full vocabulary, detached: the weight is a constant in
the loss. Original samples get w_t = 1. :class:`OTS` is the whole of it for a step: from the
constructed samples' log-probs and entropies to every sample's weights and their metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


@torch.no_grad()
def ots_weights(logp: Tensor, entropy: Tensor, mask: Tensor, *,
                w_min: float = 0.01, w_max: float = 10.0) -> Tensor:
    """``clamp(exp(logp + entropy), w_min, w_max)`` where ``mask``, 0 elsewhere; [B, T], detached."""
    if logp.shape != entropy.shape or logp.shape != mask.shape:
        raise ValueError(f"shape mismatch: logp {tuple(logp.shape)}, entropy "
                         f"{tuple(entropy.shape)}, mask {tuple(mask.shape)}")
    if w_min > w_max:
        raise ValueError(f"w_min {w_min} exceeds w_max {w_max}")
    dtype = _compute_dtype(logp)
    w = torch.exp(logp.detach().to(dtype) + entropy.detach().to(dtype)).clamp(w_min, w_max)
    return torch.where(mask.bool(), w, torch.zeros((), dtype=dtype, device=w.device))


@dataclass
class SampleWeights:
    weights: list[Tensor] | None  # per sample, over its tokens in the loss; None: no constructed sample here
    total: float  # sum of the constructed tokens' weights
    tokens: int  # constructed tokens
    prefix_total: float = 0.0  # the same over the tokens re-typed from y⁻ (before the reflection)
    prefix_tokens: int = 0

    def add_to(self, metrics) -> None:
        """``tapo/ots_weight_mean`` (and its split at the reflection point) into a
        :class:`tapo_ds.metrics.StepMetrics`; a mean without tokens is left out."""
        metrics.mean("tapo/ots_weight_mean", self.total, self.tokens, if_empty=None)
        metrics.mean("tapo/ots_weight_prefix_mean", self.prefix_total, self.prefix_tokens, if_empty=None)
        metrics.mean("tapo/ots_weight_after_mean", self.total - self.prefix_total,
                     self.tokens - self.prefix_tokens, if_empty=None)


def loss_prefix(sample) -> int:
    """How many of ``sample``'s tokens in the loss come before its reflection (0 for an original)."""
    return max(0, getattr(sample, "prefix_tokens", 0) - getattr(sample, "loss_start", 0))


def prefix_push(samples: Sequence, weights: Sequence[Tensor] | None) -> tuple[float, int]:
    """The constructed samples' signed push on the tokens they re-typed from y⁻: the sum over those tokens
    of A * w (w = 1 without OTS) and their number. Positive: the step pushes its wrong answers' copied parts,
    mistake included, up rather than down."""
    total, tokens = 0.0, 0
    for i, s in enumerate(samples):
        k = loss_prefix(s) if s.constructed else 0
        if k:
            w = float(weights[i][:k].double().sum()) if weights is not None else float(k)
            total += s.advantage * w
            tokens += k
    return total, tokens


@dataclass(frozen=True)
class OTS:
    w_min: float = 0.01
    w_max: float = 10.0

    def __call__(self, samples: Sequence, logp: Sequence[Tensor | None],
                 entropy: Sequence[Tensor | None]) -> SampleWeights:
        """Weights of ``samples`` (each with ``constructed`` and ``response_ids``). ``logp[i]`` and
        ``entropy[i]``: the response tokens of constructed sample i under the pre-update policy (any
        value for the others)."""
        out, total, tokens, pre_total, pre_tokens = [], 0.0, 0, 0.0, 0
        for s, lp, ent in zip(samples, logp, entropy):
            if not s.constructed:
                out.append(torch.ones(len(s.response_ids)))
                continue
            w = ots_weights(lp[None], ent[None], torch.ones_like(lp)[None], w_min=self.w_min, w_max=self.w_max)[0]
            total += float(w.double().sum())
            tokens += w.numel()
            k = min(loss_prefix(s), w.numel())
            pre_total += float(w[:k].double().sum())
            pre_tokens += k
            out.append(w)
        return SampleWeights(out if tokens else None, total, tokens, pre_total, pre_tokens)
