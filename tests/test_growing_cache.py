"""The in-place KV cache (tapo_ds.growing_cache): the same keys and values as transformers' concatenating
DynamicLayer through appends, row selection, repetition and joins, with bounded spare room."""

import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import DynamicLayer

from tapo_ds import kv_rows
from tapo_ds.growing_cache import GrowingLayer, growing_cache


def _kv(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g)


def test_appends_selections_and_repeats_match_dynamic_layer():
    grow, cat = GrowingLayer(room=5), DynamicLayer()
    for step, n in enumerate([7, 1, 1, 3, 1, 6, 1]):
        k, v = _kv(3 if step < 4 else 2, n, step)
        if step == 4:  # rows leave the batch, then the cache keeps appending
            for layer in (grow, cat):
                layer.batch_select_indices(torch.tensor([0, 2]))
        a, b = grow.update(k, v), cat.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert grow._kbuf.shape[-2] <= grow.keys.shape[-2] + max(n, grow.room)  # bounded spare room
    for layer in (grow, cat):
        layer.batch_repeat_interleave(2)
    k, v = _kv(4, 1, 99)
    assert torch.equal(grow.update(k, v)[0], cat.update(k, v)[0])


def test_a_model_decodes_the_same_with_either_cache_and_joins_work():
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    ids = torch.randint(1, 50, (2, 9))
    outs = []
    for make in (growing_cache, lambda config: DynamicCache(config=config)):
        cache = make(model.config)
        attn = torch.ones_like(ids)
        with torch.no_grad():
            logits = [model(input_ids=ids, attention_mask=attn, past_key_values=cache, use_cache=True).logits[:, -1]]
            other = make(model.config)
            model(input_ids=ids[:1, :4], attention_mask=attn[:1, :4], past_key_values=other, use_cache=True)
            cache, attn = kv_rows.join(cache, attn, other, attn[:1, :4])
            pos = torch.tensor([[9], [9], [4]])
            for t in range(20):
                attn = torch.cat([attn, attn.new_ones(3, 1)], dim=1)
                out = model(input_ids=torch.full((3, 1), 1 + t), attention_mask=attn, position_ids=pos + t,
                            past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
        outs.append(logits)
    assert all(isinstance(layer, GrowingLayer) for layer in growing_cache(model.config).layers)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
