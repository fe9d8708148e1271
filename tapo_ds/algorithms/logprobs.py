"""Token log-probabilities and full-vocabulary entropy from logits, in row chunks.

With a 151k vocabulary the naive ``log_softmax(logits.float())`` materialises (and, under
autograd, keeps) a float32 copy of the whole [B, T, V] tensor. Here a custom autograd
function keeps only the logits (which exist anyway) and a few floats per row, and both
the forward and the backward work on ``chunk_size`` rows at a time, so the extra memory
is a few float32 [chunk_size, V] buffers plus, in backward, the logits' gradient itself.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 1024


Segment = tuple[int, int, int]  # (b, t0, t1): rows logits[b, t0:t1]


def _chunks(logits: Tensor, chunk_size: int) -> Iterator[tuple[int, int, list[Segment]]]:
    """Yield (start, end, segments) over the flattened B*T rows; a segment is (b, t0, t1)."""
    B, T = logits.shape[:2]
    n = B * T
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        segments = []
        row = start
        while row < end:
            b, t0 = divmod(row, T)
            t1 = min(T, t0 + (end - row))
            segments.append((b, t0, t1))
            row += t1 - t0
        yield start, end, segments


def _gather_rows(logits: Tensor, flat: Optional[Tensor], start: int, end: int, segments) -> Tensor:
    if flat is not None:
        return flat[start:end]
    # Non-viewable logits (e.g. a [:, p:-1] slice): copy only this chunk, never the whole.
    return torch.cat([logits[b, t0:t1] for b, t0, t1 in segments])


def _flat_view(logits: Tensor) -> Optional[Tensor]:
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return None


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, with_entropy: bool, chunk_size: int):
        B, T, V = logits.shape
        out_dtype = torch.promote_types(logits.dtype, torch.float32)
        flat_labels = labels.reshape(-1)
        logp = torch.empty(B * T, dtype=out_dtype, device=logits.device)
        lse = torch.empty(B * T, dtype=out_dtype, device=logits.device)
        entropy = torch.empty(B * T if with_entropy else 0, dtype=out_dtype, device=logits.device)
        flat = _flat_view(logits)
        for start, end, segments in _chunks(logits, chunk_size):
            z = _gather_rows(logits, flat, start, end, segments).to(out_dtype)
            chunk_lse = torch.logsumexp(z, dim=-1)
            lse[start:end] = chunk_lse
            logp[start:end] = z.gather(-1, flat_labels[start:end, None]).squeeze(-1) - chunk_lse
            if with_entropy:
                p = torch.exp(z - chunk_lse[:, None])
                entropy[start:end] = chunk_lse - (p * z).sum(-1)
        ctx.save_for_backward(logits, flat_labels, lse, entropy)
        ctx.with_entropy = with_entropy
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp.view(B, T), entropy.view(B, T) if with_entropy else entropy

    @staticmethod
    def backward(ctx, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor]):
        logits, flat_labels, lse, entropy = ctx.saved_tensors
        if grad_logp is None and (grad_entropy is None or not ctx.with_entropy):
            return None, None, None, None
        B, T, V = logits.shape
        grad_logits = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
        flat_grad = grad_logits.view(-1, V)
        flat = _flat_view(logits)
        g_logp = grad_logp.reshape(-1) if grad_logp is not None else None
        g_ent = None
        if grad_entropy is not None and ctx.with_entropy:
            g_ent = grad_entropy.reshape(-1)
        for start, end, segments in _chunks(logits, ctx.chunk_size):
            z = _gather_rows(logits, flat, start, end, segments).to(lse.dtype)
            p = torch.exp(z - lse[start:end, None])
            g = torch.zeros_like(z)
            if g_logp is not None:
                # d logp_y / dz = onehot(y) - p
                g.sub_(p * g_logp[start:end, None])
                g.scatter_add_(-1, flat_labels[start:end, None], g_logp[start:end, None])
            if g_ent is not None:
                # dH / dz = -p * (z - E_p[z]),  E_p[z] = lse - H
                mean_z = lse[start:end] - entropy[start:end]
                g.sub_(p * (z - mean_z[:, None]) * g_ent[start:end, None])
            flat_grad[start:end] = g.to(logits.dtype)
        return grad_logits, None, None, None


def token_logprobs_and_entropy(
    logits: Tensor,
    labels: Tensor,
    with_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Optional[Tensor]]:
    """log p(labels) and, optionally, the full-vocabulary entropy, both [B, T].

    logits [B, T, V] (any float dtype, need not be contiguous), labels [B, T] long.
    Results are float32 (float64 for float64 logits). Differentiable in both outputs.
    Negative labels (an ignore-index convention) are read as token 0; mask them out.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    labels = torch.where(labels < 0, 0, labels).to(device=logits.device, dtype=torch.long)
    logp, entropy = _TokenLogProbs.apply(logits, labels, with_entropy, chunk_size)
    return logp, entropy if with_entropy else None
