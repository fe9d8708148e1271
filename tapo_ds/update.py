"""The optimizer side of a step: old log-probs, the loss over micro-batches, ``engine.step``.

Shared by RL and SFT. Every rank runs the same number of forwards and backwards (ZeRO-3
gathers parameters in each), padding with empty micro-batches; the loss of every micro-batch
is weighted by coefficients computed from the *global* counts of the optimizer step, so the
gradient does not depend on the micro-batch size, the split into micro-batches or the number
of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from tapo_ds.algorithms import (
    ORIGINAL_PART,
    GlobalCounts,
    PolicyLossParams,
    get_kl_estimator,
    get_policy_loss,
    local_counts,
    micro_batch_loss,
    token_coefficients,
    token_logprobs_and_entropy,
)
from tapo_ds.batch import MicroBatch, Sample, collate, dummy_batch, plan_micro_batches
from tapo_ds.engine import all_reduce_
from tapo_ds.metrics import StepMetrics
from tapo_ds.plain_linear import plain_linear


@dataclass(frozen=True)
class LossSettings:
    policy_loss: str
    clip: PolicyLossParams
    agg_mode: str
    part_scale: tuple[float, float]  # (originals, constructed = lambda)
    combination: str = "pooled"  # how the two parts meet in the aggregation (pooled | separate)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"


def forward_logp(module, mb: MicroBatch, with_entropy: bool):
    out = module(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
    return token_logprobs_and_entropy(out.logits[:, :-1], mb.labels, with_entropy=with_entropy)


def equal_count_across_ranks(n: int, device) -> int:
    t = torch.tensor([n], dtype=torch.long, device=device)
    return int(all_reduce_(t, "max").item())


def micro_batches(samples: Sequence[Sample], indices: Sequence[int], micro_batch_size: int,
                  pad_id: int, device, at_least: int = 0) -> list[MicroBatch]:
    """This rank's micro-batches, padded with empty ones to the count of the busiest rank (and to
    ``at_least``: an optimizer step needs one backward even when no rank has anything to train)."""
    chosen = [samples[i] for i in indices]
    plan = plan_micro_batches(chosen, micro_batch_size) if chosen else []
    mbs = [collate([chosen[j] for j in group], [indices[j] for j in group], pad_id, device) for group in plan]
    target = max(at_least, equal_count_across_ranks(len(mbs), device))
    mbs += [dummy_batch(pad_id, device) for _ in range(target - len(mbs))]
    return mbs


@torch.no_grad()
def per_token_stats(module, samples, micro_batch_size, pad_id, device, *, with_entropy: bool,
                    which: Callable[[Sample], bool] = lambda s: True):
    """Log-probs (and entropies) of the response tokens of the samples ``which`` picks, under ``module``,
    as per-sample vectors (None for the others). Every rank must call it (ZeRO-3 gathers)."""
    logps: list[torch.Tensor | None] = [None] * len(samples)
    ents: list[torch.Tensor | None] = [None] * len(samples)
    chosen = [i for i, s in enumerate(samples) if which(s)]
    for mb in micro_batches(samples, chosen, micro_batch_size, pad_id, device):
        with plain_linear():
            logp, ent = forward_logp(module, mb, with_entropy=with_entropy)
        for row, i in enumerate(mb.index):
            keep = mb.response_mask[row].bool()
            logps[i] = logp[row][keep].float().cpu()
            if ent is not None:
                ents[i] = ent[row][keep].float().cpu()
    return logps, ents


def _pad_rows(rows: Sequence[torch.Tensor], mb: MicroBatch, fill: float) -> torch.Tensor:
    """Scatter per-sample response vectors back into the micro-batch's ``[n, L-1]`` layout."""
    out = torch.full(mb.response_mask.shape, fill, dtype=torch.float32, device=mb.response_mask.device)
    for row, vec in enumerate(rows):
        out[row][mb.response_mask[row].bool()] = vec.to(out.device)
    return out


@dataclass(frozen=True)
class UpdateShares:
    """This rank's share of one optimizer step's metrics: each already divided by the step's global
    count, so the shares of all ranks add up to the step's value."""
    pg_loss: float
    clip_frac: float
    entropy: float  # over the tokens of original samples
    kl: float | None  # None without a reference
    grad_norm: float  # global already
    lr: float


def update_metrics(updates: Sequence[UpdateShares]) -> StepMetrics:
    """``actor/*``: means over the step's optimizer updates; the learning rate is the last one's."""
    m, n = StepMetrics(), len(updates)
    m.sum("actor/pg_loss", sum(u.pg_loss for u in updates) / n)
    m.sum("actor/clip_frac", sum(u.clip_frac for u in updates) / n)
    m.sum("actor/entropy", sum(u.entropy for u in updates) / n)
    if updates[0].kl is not None:
        m.sum("actor/kl", sum(u.kl for u in updates) / n)
    m.local("actor/grad_norm", sum(u.grad_norm for u in updates) / n)
    m.local("actor/lr", updates[-1].lr)
    return m


def optimizer_step(engine, samples: Sequence[Sample], indices: Sequence[int], settings: LossSettings, *,
                   micro_batch_size: int, pad_id: int, old_logp=None, token_weights=None, ref_logp=None,
                   world_size: int = 1) -> UpdateShares:
    """One optimizer step over ``samples[indices]`` (this rank's share of the global batch).

    ``old_logp``, ``token_weights`` and ``ref_logp`` are per-sample response vectors or None. Without
    ``old_logp`` the step is on-policy: the ratio is taken against this very forward's detached
    log-probs (same parameters, one forward saved). Without ``token_weights`` every token weighs 1.
    """
    device = engine.device
    mbs = micro_batches(samples, indices, micro_batch_size, pad_id, device, at_least=1)
    counts = sum((local_counts(mb.response_mask, mb.part) for mb in mbs), GlobalCounts.zeros(device=device))
    counts = GlobalCounts.from_tensor(all_reduce_(counts.as_tensor(), "sum"))
    # The step's global token counts (all parts, and original samples) divide the per-token sums below.
    tokens = max(float(counts.tokens.sum()), 1.0)
    original_tokens = max(float(counts.tokens[ORIGINAL_PART]), 1.0)
    scale = torch.tensor(settings.part_scale, dtype=torch.float32, device=device)
    loss_fn = get_policy_loss(settings.policy_loss)
    kl_fn = get_kl_estimator(settings.kl_estimator) if ref_logp is not None else None

    loss_sum = clipped = kl_sum = entropy_sum = 0.0
    for mb in mbs:
        # The entropy comes from the same chunked pass as the log-probs (cheap): a metric.
        logp, entropy = forward_logp(engine, mb, with_entropy=True)
        mask = mb.response_mask
        old = _pad_rows([old_logp[i] for i in mb.index], mb, 0.0) if old_logp is not None else logp.detach()
        weights = _pad_rows([token_weights[i] for i in mb.index], mb, 1.0) if token_weights is not None else None
        out = loss_fn(logp, old, mb.advantages, mask, weights, settings.clip)
        per_token = out.per_token_loss
        if kl_fn is not None:
            kl = kl_fn(logp, _pad_rows([ref_logp[i] for i in mb.index], mb, 0.0)) * mask
            per_token = per_token + settings.kl_coef * kl
            kl_sum += float((kl.detach() * mask).sum())
        coef = token_coefficients(mask, mb.part, scale, counts, settings.agg_mode, settings.combination)
        loss = micro_batch_loss(per_token, coef)
        # DeepSpeed averages gradients over ranks; the coefficients already normalise globally.
        engine.backward(loss * world_size, scale_wrt_gas=False)
        loss_sum += float(loss.detach())
        clipped += out.metrics.get("actor/clip_frac", 0.0) * float(mask.sum())
        original = mask * (mb.part == ORIGINAL_PART).unsqueeze(1)
        entropy_sum += float((entropy.detach() * original).sum())
    engine.step()
    return UpdateShares(pg_loss=loss_sum, clip_frac=clipped / tokens, entropy=entropy_sum / original_tokens,
                        kl=kl_sum / tokens if kl_fn is not None else None, grad_norm=grad_norm(engine),
                        lr=engine.get_lr()[0])


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)
