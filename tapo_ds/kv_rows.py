"""Rows joining a running decode batch: the KV cache and attention mask of two batches made one.

Both batches are left-padded, so the shorter one gets more left padding (zeros in the cache, 0 in the
mask); positions travel with each row (``position_ids``), so the padding changes no row's result. Only
full-attention cache layers can be joined this way: a sliding window drops its oldest entries, and
which ones depends on the row's length.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def joinable(cache: DynamicCache) -> bool:
    return all(isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in cache.layers)


def join(cache: DynamicCache, attn: torch.Tensor, new_cache: DynamicCache,
         new_attn: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """``cache``'s rows then ``new_cache``'s, in ``cache`` (changed in place); masks ``[rows, length]``."""
    if not (joinable(cache) and joinable(new_cache)):
        raise NotImplementedError("only full-attention KV caches (DynamicLayer and its growing kind) can be joined")
    if len(cache.layers) != len(new_cache.layers):
        raise ValueError(f"caches of {len(cache.layers)} and {len(new_cache.layers)} layers")
    la, lb = attn.shape[1], new_attn.shape[1]
    length = max(la, lb)
    for a, b in zip(cache.layers, new_cache.layers):
        if a.keys.shape[-2] != la or b.keys.shape[-2] != lb:
            raise ValueError("a cache's length differs from its attention mask's")
        a.keys = torch.cat([_left_pad(a.keys, length - la, -2), _left_pad(b.keys, length - lb, -2)], dim=0)
        a.values = torch.cat([_left_pad(a.values, length - la, -2), _left_pad(b.values, length - lb, -2)], dim=0)
    mask = torch.cat([_left_pad(attn, length - la, 1), _left_pad(new_attn, length - lb, 1)], dim=0)
    return cache, mask
