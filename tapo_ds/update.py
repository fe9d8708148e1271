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
                  pad_id: int, device) -> list[MicroBatch]:
    """This rank's micro-batches, padded with empty ones to the count of the busiest rank."""
    chosen = [samples[i] for i in indices]
    plan = plan_micro_batches(chosen, micro_batch_size) if chosen else []
    mbs = [collate([chosen[j] for j in group], [indices[j] for j in group], pad_id, device) for group in plan]
    target = equal_count_across_ranks(len(mbs), device)
    mbs += [dummy_batch(pad_id, device) for _ in range(target - len(mbs))]
    return mbs


@torch.no_grad()
def per_token_stats(module, samples, micro_batch_size, pad_id, device, *, with_entropy: bool,
                    entropy_for: Callable[[Sample], bool] = lambda s: True):
    """Log-probs (and entropies) of every sample's response tokens under ``module``, as lists."""
    logps: list[torch.Tensor | None] = [None] * len(samples)
    ents: list[torch.Tensor | None] = [None] * len(samples)
    need_entropy = with_entropy and any(entropy_for(s) for s in samples)
    for mb in micro_batches(samples, range(len(samples)), micro_batch_size, pad_id, device):
        logp, ent = forward_logp(module, mb, with_entropy=need_entropy)
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


def optimizer_step(engine, samples: Sequence[Sample], indices: Sequence[int], settings: LossSettings, *,
                   micro_batch_size: int, pad_id: int, old_logp=None, token_weights=None, ref_logp=None,
                   world_size: int = 1) -> dict[str, float]:
    """One optimizer step over ``samples[indices]`` (this rank's share of the global batch).

    ``old_logp``/``ref_logp`` are per-sample response vectors or None. Without ``old_logp`` the
    step is on-policy: the ratio is taken against this very forward's detached log-probs (same
    parameters, one forward saved). ``token_weights`` is per-sample vectors, None, or a callable
    ``(micro_batch, logp, entropy) -> [n, L-1]`` evaluated on this forward (on-policy OTS).
    """
    device = engine.device
    mbs = micro_batches(samples, indices, micro_batch_size, pad_id, device)
    counts = sum((local_counts(mb.response_mask, mb.part) for mb in mbs), GlobalCounts.zeros(device=device))
    counts = GlobalCounts.from_tensor(all_reduce_(counts.as_tensor(), "sum"))
    scale = torch.tensor(settings.part_scale, dtype=torch.float32, device=device)
    loss_fn = get_policy_loss(settings.policy_loss)
    kl_fn = get_kl_estimator(settings.kl_estimator) if ref_logp is not None else None

    # loss, clipped tokens, kl, tokens, entropy sum and tokens of original samples
    total = torch.zeros(6, dtype=torch.float64, device=device)
    for mb in mbs:
        fused_weights = callable(token_weights) and bool(mb.part.any())
        # The entropy comes from the same chunked pass as the log-probs (cheap): a metric, and
        # the OTS weights of on-policy constructed samples.
        logp, entropy = forward_logp(engine, mb, with_entropy=True)
        mask = mb.response_mask
        old = _pad_rows([old_logp[i] for i in mb.index], mb, 0.0) if old_logp is not None else logp.detach()
        if callable(token_weights):
            # On-policy: this forward *is* the pre-update policy, so OTS weights come from it.
            weights = token_weights(mb, logp.detach(), entropy.detach()) if fused_weights else None
        elif token_weights is not None:
            weights = _pad_rows([token_weights[i] for i in mb.index], mb, 1.0)
        else:
            weights = None
        out = loss_fn(logp, old, mb.advantages, mask, weights, settings.clip)
        per_token = out.per_token_loss
        if kl_fn is not None:
            kl = kl_fn(logp, _pad_rows([ref_logp[i] for i in mb.index], mb, 0.0)) * mask
            per_token = per_token + settings.kl_coef * kl
            total[2] += float((kl.detach() * mask).sum())
        coef = token_coefficients(mask, mb.part, scale, counts, settings.agg_mode, settings.combination)
        loss = micro_batch_loss(per_token, coef)
        # DeepSpeed averages gradients over ranks; the coefficients already normalise globally.
        engine.backward(loss * world_size, scale_wrt_gas=False)
        total[0] += float(loss.detach())
        valid = float(mask.sum())
        total[1] += out.metrics.get("actor/clip_frac", 0.0) * valid
        total[3] += valid
        original = mask * (mb.part == 0).unsqueeze(1)
        total[4] += float((entropy.detach() * original).sum())
        total[5] += float(original.sum())
    engine.step()
    all_reduce_(total, "sum")
    tokens = max(float(total[3]), 1.0)
    metrics = {
        "actor/pg_loss": float(total[0]),
        "actor/clip_frac": float(total[1]) / tokens,
        "actor/entropy": float(total[4]) / max(float(total[5]), 1.0),
        "actor/grad_norm": _grad_norm(engine),
        "actor/lr": engine.get_lr()[0],
    }
    if kl_fn is not None:
        metrics["actor/kl"] = float(total[2]) / tokens
    return metrics


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)
