"""A KV cache that appends in place: the decode loop's cache without a copy of the whole cache per token.

transformers' ``DynamicLayer`` appends by ``torch.cat``, which copies every cached key and value at every
decode step: O(length) work per token, O(length²) per sequence, and on CPU the largest single cost of a
decode step at a few hundred tokens (measured: ``aten::cat`` 18-44 % of a miniature decode step). A
:class:`GrowingLayer` keeps its keys and values in buffers with spare room along the sequence and writes
new positions into them; ``keys``/``values`` are views of the filled part, so everything that reads a
``DynamicLayer`` reads it unchanged. When the room runs out the buffers grow by a fixed ``room`` of
positions (one copy every ``room`` tokens: the copying falls by that factor, and the cache never holds more
than ``room`` unused positions per row, where doubling could hold as many as it uses; a cache of an 8B model
over thousands of tokens is the larger part of a GPU's memory).
Whoever replaces ``keys``/``values`` (``batch_select_indices``, :mod:`tapo_ds.kv_rows`'s join) simply
assigns new tensors, as with a ``DynamicLayer``; the next append adopts them into fresh buffers.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 128  # positions a buffer grows by


class GrowingLayer(DynamicLayer):
    def __init__(self, room: int = ROOM):
        super().__init__()
        self.room = max(int(room), 1)
        self._kbuf = self._vbuf = None
        self._view = None  # the keys tensor this layer last handed out

    def _adopt(self, extra: int) -> None:
        """Fresh buffers holding the current keys/values (assigned from outside) plus room for ``extra``."""
        k, v = self.keys, self.values
        length = k.shape[-2]
        cap = length + max(extra, self.room)
        self._kbuf = k.new_empty(k.shape[:-2] + (cap, k.shape[-1]))
        self._vbuf = v.new_empty(v.shape[:-2] + (cap, v.shape[-1]))
        self._kbuf[..., :length, :] = k
        self._vbuf[..., :length, :] = v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.dim() != 4:  # empty: the first update
            self.keys = key_states.new_empty(key_states.shape[:-2] + (0, key_states.shape[-1]))
            self.values = value_states.new_empty(value_states.shape[:-2] + (0, value_states.shape[-1]))
            self._view = None
        n = key_states.shape[-2]
        length = self.keys.shape[-2]
        if self.keys is not self._view or self._kbuf is None or length + n > self._kbuf.shape[-2] \
                or self._kbuf.shape[0] != key_states.shape[0]:
            self._adopt(n)
        self._kbuf[..., length:length + n, :] = key_states
        self._vbuf[..., length:length + n, :] = value_states
        self.keys = self._kbuf[..., :length + n, :]
        self.values = self._vbuf[..., :length + n, :]
        self._view = self.keys
        return self.keys, self.values


def growing_cache(config, room: int = ROOM) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers append in place (sliding-window layers,
    which drop their oldest positions, stay as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
