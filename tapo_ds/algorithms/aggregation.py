"""Turning per-token losses into the step's scalar loss, invariant to how the step is split.

Part 0 holds the original samples, part 1 the constructed ones; ``part_scale = (1, lambda)``
multiplies each part's per-token loss. How the parts meet is the *loss combination*:

- ``pooled`` (default): the constructed samples are extra sequences of the step and ONE
  aggregation runs over all of them. seq-mean-token-mean averages every sequence's token
  mean over originals + constructed together; token-mean divides by the tokens of both.
  L = sum_i scale[p_i] * l_i / N (seq-mean-token-mean, N = all sequences of the step).
- ``separate``: each part is averaged over its own sequences (tokens), then the means add:
  L = sum_p scale[p] * mean_p, i.e. L_GRPO + lambda * L_ref with each term on its own scale.

Either way every mean divides by a count over the WHOLE optimizer step, so each token gets
a fixed coefficient computed from global counts, and the step loss is a plain sum of
coefficient-weighted per-token losses. Sums can be split across micro-batches and ranks in
any way without changing the result, which a per-micro-batch mean cannot.

What the trainer does with them (``tapo_ds/update.py``, ``optimizer_step``):
  1. Before the first backward of an optimizer step, it sums :func:`local_counts` over all of
     this rank's micro-batches and all-reduces (SUM) the result over data-parallel ranks
     (:meth:`GlobalCounts.as_tensor` / :meth:`GlobalCounts.from_tensor` make it one call).
  2. For each micro-batch: coef = token_coefficients(...), loss = micro_batch_loss(...),
     ``engine.backward(loss * world_size, scale_wrt_gas=False)``. Gradient accumulation is the
     trainer's (a TAPO step has a variable number of micro-batches per rank): DeepSpeed is
     configured with one accumulation step and ``scale_wrt_gas=False`` keeps it from dividing
     the loss, since the coefficients already normalise over the whole step; ``* world_size``
     undoes DeepSpeed's averaging of gradients over data-parallel ranks, so the accumulated
     gradient is exactly dL/dtheta.
  3. One ``engine.step()`` per optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .registry import Registry

ORIGINAL_PART = 0
CONSTRUCTED_PART = 1
NUM_PARTS = 2


@dataclass
class GlobalCounts:
    """Counts per part: sequences with at least one valid token, and valid tokens."""

    seqs: Tensor  # [P] int64
    tokens: Tensor  # [P] int64

    def __add__(self, other: "GlobalCounts") -> "GlobalCounts":
        return GlobalCounts(seqs=self.seqs + other.seqs, tokens=self.tokens + other.tokens)

    def __radd__(self, other: object) -> "GlobalCounts":
        # Lets builtin sum() start from its default 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def as_tensor(self) -> Tensor:
        """[2, P] int64, to all-reduce both counts in one collective."""
        return torch.stack([self.seqs, self.tokens])

    @classmethod
    def from_tensor(cls, t: Tensor) -> "GlobalCounts":
        return cls(seqs=t[0], tokens=t[1])

    @classmethod
    def zeros(
        cls, num_parts: int = NUM_PARTS, device: torch.device | str | None = None
    ) -> "GlobalCounts":
        z = torch.zeros(num_parts, dtype=torch.long, device=device)
        return cls(seqs=z, tokens=z.clone())


def local_counts(mask: Tensor, part: Tensor, num_parts: int = NUM_PARTS) -> GlobalCounts:
    """Counts of one micro-batch; mask [B, T], part [B] long in [0, num_parts)."""
    lengths = mask.bool().sum(-1)
    part = part.to(device=mask.device, dtype=torch.long)
    zeros = torch.zeros(num_parts, dtype=torch.long, device=mask.device)
    # Empty sequences carry no loss, so counting them would only dilute the mean.
    seqs = zeros.index_add(0, part, (lengths > 0).long())
    tokens = zeros.index_add(0, part, lengths)
    return GlobalCounts(seqs=seqs, tokens=tokens)


CombinationFn = Callable[[GlobalCounts], GlobalCounts]

_COMBINATIONS: Registry[CombinationFn] = Registry("loss combination")


def register_combination(name: str) -> Callable[[CombinationFn], CombinationFn]:
    """A combination maps the step's counts per part to the counts each part's mean divides by."""
    return _COMBINATIONS.register(name)


def combination_names() -> list[str]:
    return _COMBINATIONS.names()


@register_combination("pooled")
def _pooled(counts: GlobalCounts) -> GlobalCounts:
    """Every part divides by the counts of all parts together: one aggregation over the step."""
    return GlobalCounts(seqs=counts.seqs.sum().expand_as(counts.seqs).clone(),
                        tokens=counts.tokens.sum().expand_as(counts.tokens).clone())


@register_combination("separate")
def _separate(counts: GlobalCounts) -> GlobalCounts:
    """Every part divides by its own counts: sum_p scale[p] * mean_p."""
    return counts


AggregationFn = Callable[[Tensor, Tensor, Tensor, GlobalCounts], Tensor]

_AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation")


def register_aggregation(name: str) -> Callable[[AggregationFn], AggregationFn]:
    return _AGGREGATIONS.register(name)


def aggregation_names() -> list[str]:
    return _AGGREGATIONS.names()


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    # A part with no sequences (or an empty sequence) contributes nothing rather than NaN.
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), 0.0)


@register_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(
    mask: Tensor, part: Tensor, part_scale: Tensor, counts: GlobalCounts
) -> Tensor:
    """coef = scale[p] / (n_seqs[p] * T_i): each sequence's token mean, averaged over n_seqs[p].

    n_seqs[p] is what the combination made of the counts: part p's own, or all parts'.
    """
    lengths = mask.sum(-1)
    denominator = counts.seqs.to(mask.dtype)[part] * lengths
    return _safe_divide(part_scale[part], denominator).unsqueeze(-1) * mask


@register_aggregation("token-mean")
def _token_mean(mask: Tensor, part: Tensor, part_scale: Tensor, counts: GlobalCounts) -> Tensor:
    """coef = scale[p] / n_tokens[p]: every token of a part weighs the same (n_tokens as combined)."""
    denominator = counts.tokens.to(mask.dtype)[part]
    return _safe_divide(part_scale[part], denominator).unsqueeze(-1) * mask


def token_coefficients(
    mask: Tensor,
    part: Tensor,
    part_scale: Tensor,
    counts: GlobalCounts,
    mode: str = "seq-mean-token-mean",
    combination: str = "pooled",
) -> Tensor:
    """[B, T] coefficients in part_scale's dtype on mask's device; 0 on padding.

    ``counts`` must be the global counts of the whole optimizer step (all micro-batches,
    all ranks); with those, summing :func:`micro_batch_loss` over the step gives the step
    loss of ``mode`` under ``combination`` (see the module docstring) exactly.
    """
    aggregate = _AGGREGATIONS.get(mode)
    combine = _COMBINATIONS.get(combination)
    if not part_scale.is_floating_point():
        raise ValueError("part_scale must be a floating-point tensor")
    if part_scale.numel() != counts.seqs.numel():
        raise ValueError(
            f"part_scale has {part_scale.numel()} parts but counts have {counts.seqs.numel()}"
        )
    # The mask's device wins: part_scale is typically built on the CPU from the config.
    device = mask.device
    part_scale = part_scale.to(device)
    mask_f = mask.to(dtype=part_scale.dtype)
    part = part.to(device=device, dtype=torch.long)
    counts = GlobalCounts(seqs=counts.seqs.to(device), tokens=counts.tokens.to(device))
    return aggregate(mask_f, part, part_scale, combine(counts))


def micro_batch_loss(per_token_loss: Tensor, coefficients: Tensor) -> Tensor:
    """This micro-batch's share of the step loss; shares add up to the step loss exactly.

    This is the value to log. What goes to ``engine.backward`` is scaled to undo DeepSpeed's
    own averaging (see the module docstring).
    """
    return (per_token_loss * coefficients.to(per_token_loss.dtype)).sum()
