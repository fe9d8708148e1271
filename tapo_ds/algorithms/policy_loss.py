"""Per-token policy-gradient losses. Aggregating tokens into a scalar is aggregation.py's job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from .registry import Registry


@dataclass(frozen=True)
class PolicyLossParams:
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low gives "clip-higher"


@dataclass
class PolicyLossOutput:
    per_token_loss: Tensor  # [B, T], token weights applied, exactly 0 where mask == 0
    metrics: dict[str, float] = field(default_factory=dict)


PolicyLossFn = Callable[
    [Tensor, Tensor, Tensor, Tensor, Optional[Tensor], PolicyLossParams], PolicyLossOutput
]

_POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")

# |log ratio| beyond this only happens on garbage; exp() of it would overflow float32.
_MAX_LOG_RATIO = 20.0


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    return _POLICY_LOSSES.register(name)


def get_policy_loss(name: str) -> PolicyLossFn:
    return _POLICY_LOSSES.get(name)


def policy_loss_names() -> list[str]:
    return _POLICY_LOSSES.names()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid positions; 0 (not NaN) when there are none."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _require_constant(name: str, t: Optional[Tensor]) -> None:
    # These come from the pre-update policy or the rewards; a gradient through them
    # would silently change the objective, so treat it as a caller bug.
    if t is not None and t.requires_grad:
        raise ValueError(f"{name} must be a constant (computed under no_grad or detached)")


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    token_weights: Optional[Tensor],
    params: PolicyLossParams,
) -> PolicyLossOutput:
    """-w_t * min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A), rho = exp(logp - old_logp)."""
    _require_constant("old_logp", old_logp)
    _require_constant("advantages", advantages)
    _require_constant("token_weights", token_weights)
    valid = mask.bool()
    # Padding may hold arbitrary log-probs; zeroing the log ratio there (rather than the
    # loss afterwards) keeps exp() finite, so no inf * 0 = NaN reaches the gradient.
    log_ratio = torch.where(valid, logp - old_logp, 0.0).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - params.clip_low, 1.0 + params.clip_high)
    loss = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        loss = loss * token_weights.to(loss.dtype)
    loss = torch.where(valid, loss, 0.0)

    with torch.no_grad():
        metrics = {
            # Tokens whose gradient the clip removed.
            "actor/clip_frac": masked_mean((clipped > unclipped).to(logp.dtype), valid).item(),
            "actor/ppo_kl": masked_mean(-log_ratio, valid).item(),
        }
    return PolicyLossOutput(per_token_loss=loss, metrics=metrics)


@register_policy_loss("nll")
def nll_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    token_weights: Optional[Tensor],
    params: PolicyLossParams,
) -> PolicyLossOutput:
    """-w_t * log p(y_t): supervised fine-tuning through the same update path as RL (the
    cold-start stage); ``old_logp``, ``advantages`` and ``params`` are not used."""
    _require_constant("token_weights", token_weights)
    valid = mask.bool()
    loss = -logp
    if token_weights is not None:
        loss = loss * token_weights.to(loss.dtype)
    return PolicyLossOutput(per_token_loss=torch.where(valid, loss, 0.0), metrics={})
