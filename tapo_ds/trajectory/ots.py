"""OOD Token Suppression (docs/method.md §OTS): per-token weights for constructed samples.

    s_t = log p(y_t | x, y_<t) + H[p(. | x, y_<t)],   w_t = clamp(exp(s_t), w_min, w_max)

from the pre-update policy (the forward pass that yields the old log-probs), entropy over
the full vocabulary, detached: the weight is a constant in the loss. Original samples,
and every sample when OTS is off, get w_t = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last (vocabulary) dimension, in at least float32."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


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


@torch.no_grad()
def ots_token_weights(logp: Tensor, entropy: Tensor, mask: Tensor, constructed: Tensor, *,
                      enabled: bool = True, w_min: float = 0.01, w_max: float = 10.0) -> Tensor:
    """Per-token loss weights for a mixed batch: OTS rows where ``constructed[b]``, 1 elsewhere.

    Rows of original samples are all ones (the loss applies its own mask); with
    ``enabled=False`` (``ots: false``) the whole tensor is ones.
    """
    dtype = _compute_dtype(logp)
    ones = torch.ones(logp.shape, dtype=dtype, device=logp.device)
    if not enabled:
        return ones
    constructed = constructed.to(device=logp.device, dtype=torch.bool)
    if constructed.shape != logp.shape[:1]:
        raise ValueError(f"constructed has shape {tuple(constructed.shape)}, expected "
                         f"({logp.shape[0]},)")
    if not bool(constructed.any()):
        return ones
    w = ots_weights(logp, entropy, mask, w_min=w_min, w_max=w_max)
    return torch.where(constructed[:, None], w, ones)


@torch.no_grad()
def ots_weight_sums(weights: Tensor, mask: Tensor, constructed: Tensor) -> tuple[float, int]:
    """Sum of the weights over the valid tokens of constructed rows, and their count.

    Sums (not a mean) so that micro-batches and ranks can be combined exactly.
    """
    sel = mask.bool() & constructed.to(device=mask.device, dtype=torch.bool)[:, None]
    return float(weights[sel].double().sum()), int(sel.sum())


def ots_metrics(weights: Tensor, mask: Tensor, constructed: Tensor) -> dict[str, float]:
    """``{"tapo/ots_weight_mean": ...}`` over constructed valid tokens; ``{}`` when there are none."""
    total, count = ots_weight_sums(weights, mask, constructed)
    return {"tapo/ots_weight_mean": total / count} if count else {}
