"""Prompt-lookup drafts (tapo_ds.lookup_draft): the proposal, and a decode that verifies drafts emits the
same text (greedy) and the same distribution (sampling) as token-by-token decoding, in fewer forwards."""

import pytest
import torch
from deepspeed.runtime.rollout.base import RolloutRequest, SamplingConfig
from transformers import Qwen3Config, Qwen3ForCausalLM

from tapo_ds import lookup_draft
from tapo_ds.decode_loop import _DecodeLoop, warp
from tapo_ds.lookup_draft import NO_TOKEN, LookupDraft, propose

PAD, STOP = 0, 1


def _propose(source, written, room=8, **kw):
    cfg = LookupDraft(**{"tokens": 4, "min_match": 2, "max_match": 6, **kw})
    src = torch.tensor([source])
    hist = torch.tensor([[NO_TOKEN] * (cfg.max_match - len(written)) + written[-cfg.max_match:]])
    draft, count = propose(src, hist, torch.tensor([room]), cfg)
    return draft[0, :int(count[0])].tolist()


def test_propose_takes_the_longest_match_then_the_last():
    #            0  1  2  3  4  5  6  7  8  9 10 11
    source = [5, 6, 7, 8, 9, 2, 6, 7, 3, 4, 7, 5]
    assert _propose(source, [5, 6, 7]) == [8, 9, 2, 6]      # "5 6 7" matches at 0 only: its length wins
    assert _propose(source, [9, 6, 7]) == [3, 4, 7, 5]      # "6 7" twice: the last one
    assert _propose(source, [4, 7]) == [5]                   # the source ends after one token
    assert _propose(source, [7, 5]) == []                    # nothing follows the last match
    assert _propose(source, [3, 9]) == []                    # no match of min_match tokens
    assert _propose(source, [5, 6, 7], room=2) == [8, 9]     # the row's token limit
    assert _propose(source, [6]) == []                       # shorter than min_match


def test_propose_ignores_padding():
    source = [NO_TOKEN, NO_TOKEN, 6, 7, 8]
    assert _propose(source, [NO_TOKEN, 6, 7][-2:]) == [8]
    assert _propose([NO_TOKEN, NO_TOKEN, 6], [NO_TOKEN]) == []
    with pytest.raises(ValueError, match="min_match"):
        LookupDraft(tokens=4, min_match=0)


def _bigram_model(logits: torch.Tensor) -> Qwen3ForCausalLM:
    """A Qwen3 whose next-token logits are ``logits[current token]`` (attention and MLP outputs zeroed)."""
    V = logits.shape[0]
    H = 32
    cfg = Qwen3Config(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :V] = torch.eye(V)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1 / H ** 0.5)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :V] = logits.t()
    return model


def _decode(model, prompts, sampling, lookup, seed=0):
    ids = torch.tensor(prompts)
    g = torch.Generator().manual_seed(seed)
    loop = _DecodeLoop(model, [STOP], PAD, 0.125, sampling, None, g, None, lookup)
    with torch.no_grad():
        loop.run(RolloutRequest(ids, torch.ones_like(ids)))
    return [loop.out[i, :int(loop.gen[i])].tolist() for i in range(loop.out.shape[0])], loop.counters


def test_copying_takes_fewer_forwards_and_writes_the_same_text():
    V = 16
    nxt = {t: 2 + (t - 1) % (V - 2) for t in range(2, V)}  # a cycle over 2..15, never the stop token
    logits = torch.zeros(V, V)
    for t, n in nxt.items():
        logits[t, n] = 20.0
    model = _bigram_model(logits)
    chain = [2]
    while len(chain) < 24:
        chain.append(nxt[chain[-1]])
    prompts = [chain[:20], chain[3:23]]
    greedy = SamplingConfig(max_new_tokens=40, temperature=0.0, n_samples_per_prompt=2)
    plain, c0 = _decode(model, prompts, greedy, None)
    drafted, c1 = _decode(model, prompts, greedy, LookupDraft(tokens=8, min_match=3))
    assert drafted == plain and all(len(r) == 40 for r in plain)
    assert c0["decode_steps"] == 39 and c1["decode_steps"] <= 10
    assert c1["draft_accepted"] == c1["draft_tokens"] > 0


def test_sampling_distribution_is_unchanged_by_drafts():
    """Per-position token marginals of many samples match the exact Markov-chain marginals, with and without
    drafts (temperature, top-k and top-p on; the stop token ends rows inside drafts)."""
    V, L = 8, 6
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(V, V, generator=g) * 1.5
    logits[:, STOP] = -1.0
    logits[:, PAD] = -30.0
    model = _bigram_model(logits)
    sampling = SamplingConfig(max_new_tokens=L, temperature=0.8, top_k=5, top_p=0.9, n_samples_per_prompt=1500)
    probs = warp(logits, sampling).softmax(-1)
    probs[STOP] = torch.nn.functional.one_hot(torch.tensor(STOP), V).float()  # ended rows stay "ended"
    prompt = [3, 4, 5, 2, 6, 3, 7, 4, 2, 5, 6, 7, 3, 2]  # many bigrams the chain also samples: drafts fire
    marginal = probs[prompt[-1]]
    exact = []
    for _ in range(L):
        exact.append(marginal)
        marginal = marginal @ probs
    exact = torch.stack(exact)
    plain = None
    for lookup in (None, LookupDraft(tokens=4, min_match=1, max_match=4)):
        rows, counters = _decode(model, [prompt], sampling, lookup, seed=3)
        plain = plain or counters
        seen = torch.zeros(L, V)
        for r in rows:
            padded = (r + [STOP] * L)[:L]
            seen[torch.arange(L), torch.tensor(padded)] += 1
        seen /= len(rows)
        tv = 0.5 * (seen - exact).abs().sum(-1)
        assert float(tv.max()) < 0.05, (lookup, tv)
        if lookup is not None:  # drafts were proposed, some kept and some rejected
            assert 0 < counters["draft_accepted"] < counters["draft_tokens"]
            assert counters["row_steps"] < plain["row_steps"]  # rows end in fewer forwards


def test_kept_positions_and_cache_holes_leave_attention_exact(monkeypatch):
    """A real (attending) model, greedy: drafts that are partly the greedy text and partly wrong leave holes in
    the KV cache; the text is still exactly the token-by-token one."""
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    model = Qwen3ForCausalLM(cfg).eval()
    prompts = torch.randint(2, 40, (3, 12)).tolist()
    greedy = SamplingConfig(max_new_tokens=30, temperature=0.0, n_samples_per_prompt=2)
    plain, _ = _decode(model, prompts, greedy, None)
    reference = torch.full((len(plain), 40), 3, dtype=torch.long)
    for i, r in enumerate(plain):
        reference[i, :len(r)] = torch.tensor(r)

    def drafts_from_reference(source, history, room, cfg):
        # what the loop wrote so far is a prefix of the reference: draft its continuation, spoilt from the
        # third token on in every other row
        n = len(source)
        written = (history >= 0).sum(-1)
        draft = torch.zeros((n, cfg.tokens), dtype=torch.long)
        for i in range(n):
            row = rows_of[i]
            at = int(gen_of[row])
            draft[i] = reference[row, at:at + cfg.tokens] if at + cfg.tokens <= 40 else 3
            if i % 2:
                draft[i, 2:] = (draft[i, 2:] + 1) % 40
        count = torch.minimum(torch.full((n,), cfg.tokens), room) * (written >= 0)
        return draft, count

    rows_of, gen_of = None, None
    original = _DecodeLoop._propose

    def spy(self):
        nonlocal rows_of, gen_of
        rows_of, gen_of = self.rows, self.gen
        return original(self)

    monkeypatch.setattr(_DecodeLoop, "_propose", spy)
    monkeypatch.setattr(lookup_draft, "propose", drafts_from_reference)
    drafted, counters = _decode(model, prompts, greedy, LookupDraft(tokens=4, min_match=1))
    assert drafted == plain
    assert 0 < counters["draft_accepted"] < counters["draft_tokens"]
    assert counters["decode_steps"] < 29
