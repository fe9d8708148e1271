"""TapoRollout: HF-greedy equivalence, masks/stop/truncation, seeding, K-sample layout, ZeRO-3.

Also a worker for the 2-rank check: ``deepspeed --num_gpus 2 tests/test_rollout.py`` (run by
``test_two_rank_zero3_lockstep``) checks that ranks whose sequences end at different steps
neither deadlock under per-step gathers nor change their results.
"""

import copy
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from deepspeed.runtime.rollout.base import RolloutRequest, SamplingConfig
from transformers import AutoModelForCausalLM, Qwen2Config

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

from tapo_ds.modeling import build_tiny_model_and_tokenizer  # noqa: E402
from tapo_ds.rollout import TapoRollout, sample_next_token  # noqa: E402

PROMPTS = ["hello", "a much longer prompt here", "x", "what is 2+2?", "Step 1: compute", "zzz"]
T = 24  # max_new_tokens of the greedy checks


def tiny(stop_bias: float = 0.0, seed: int = 0):
    """The tiny Qwen2 with a biased lm_head, so the stop token wins often enough that some
    rows end early and some run to the limit (random weights alone rarely stop)."""
    model, tok = build_tiny_model_and_tokenizer(seed, initializer_range=0.3, tie_word_embeddings=False)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[tok.eos_token_id] = stop_bias
    model.lm_head = head
    return model.eval(), tok


@functools.lru_cache(maxsize=None)
def varied_bias() -> tuple[float, tuple[int, ...]]:
    """A stop bias under which greedy decoding of PROMPTS is a real test: at least half the
    rows stop before T at different lengths and at least one runs to T. Searched rather than
    hard-coded so that changes to the tiny model (vocab, init) do not silently trivialise the
    tests. Returns the bias and the greedy lengths."""
    model, tok = tiny()
    roll = TapoRollout(model, tok, stops(tok), tok.pad_token_id)
    for bias in (2.0, 1.5, 2.5, 1.0, 3.0, 3.5, 4.0, 0.5, 5.0):
        model.lm_head.bias.data[tok.eos_token_id] = bias
        lengths = roll.generate(request(tok), SamplingConfig(max_new_tokens=T, temperature=0.0)).response_lengths
        stopped = [n for n in lengths.tolist() if n < T]
        if len(set(stopped)) >= 2 and len(PROMPTS) // 2 <= len(stopped) < len(PROMPTS):
            return bias, tuple(lengths.tolist())
    raise AssertionError("no stop bias gives varied greedy lengths on the tiny model")


def factory(config):
    def build():
        m = AutoModelForCausalLM.from_config(config)
        m.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        return m
    return build


def request(tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left"
    return RolloutRequest(enc.input_ids, enc.attention_mask)


def stops(tok):
    # Two stop ids, as Qwen; one of them is also the pad id (a real token, not padding).
    return [tok.eos_token_id, tok.pad_token_id]


@pytest.mark.parametrize("compact_fraction", [0.0, 0.5])
def test_greedy_matches_hf_generate(compact_fraction):
    model, tok = tiny(varied_bias()[0])
    req = request(tok)
    roll = TapoRollout(model, tok, stops(tok), tok.pad_token_id, compact_fraction=compact_fraction)
    res = roll.generate(req, SamplingConfig(max_new_tokens=T, temperature=0.0))
    hf = model.generate(req.prompt_ids, attention_mask=req.prompt_attention_mask, max_new_tokens=T,
                        do_sample=False, eos_token_id=stops(tok), pad_token_id=tok.pad_token_id)
    hf = hf[:, req.prompt_ids.shape[1]:]
    lengths = res.response_lengths.tolist()
    assert 1 < len(set(lengths)) and min(lengths) < T and max(lengths) == T  # the case is not trivial
    assert res.stats["compactions"] >= 1  # rows really were dropped mid-decode
    for i, n in enumerate(lengths):
        assert res.response_ids[i, :n].tolist() == hf[i, :n].tolist(), f"row {i}"
        hf_stopped = bool(torch.isin(hf[i], torch.tensor(stops(tok))).any())
        assert bool(res.truncated[i]) == (not hf_stopped)


class ScriptedLM(torch.nn.Module):
    """Logits we control: after a prompt with L real tokens, response token j is ``10 + j``
    and the stop token comes at j == L - 2. L rides in the KV cache, so row dropping must
    keep cache rows and batch rows aligned for the script to stay right."""

    STOP, PAD = 1, 0

    def __init__(self):
        super().__init__()
        self.config = Qwen2Config(num_hidden_layers=1, vocab_size=64, hidden_size=8, num_attention_heads=1,
                                  num_key_value_heads=1)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache=True, logits_to_keep=0):
        n, t = input_ids.shape
        L = attention_mask[:, -t:].sum(-1) if past_key_values.get_seq_length() == 0 else None
        kv = torch.zeros(n, 1, t, 1)
        if L is not None:
            kv[:] = L.float().view(n, 1, 1, 1)
        keys, _ = past_key_values.update(kv, kv, 0)
        L = keys[:, 0, 0, 0].long()
        j = position_ids[:, -1] - (L - 1)  # index of the response token these logits produce
        token = torch.where(j == L - 2, torch.full_like(j, self.STOP), 10 + j)
        logits = torch.full((n, 1, 64), -1e4)
        logits[torch.arange(n), 0, token] = 0.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("compact_fraction", [0.0, 0.3, 9.0])
def test_masks_stop_and_truncation(compact_fraction):
    lm = ScriptedLM()
    P = lm.PAD
    prompts = [[5, 5, 5], [5, 5, 5, 5, 5, 5, 5], [5, 5, 5, 5], [5] * 12]  # L = 3, 7, 4, 12
    Tp = 12
    ids = torch.tensor([[P] * (Tp - len(p)) + p for p in prompts])
    mask = (torch.arange(Tp)[None] >= torch.tensor([Tp - len(p) for p in prompts])[:, None]).long()
    T, K = 8, 2
    roll = TapoRollout(lm, None, [lm.STOP], P, compact_fraction=compact_fraction)
    res = roll.generate(RolloutRequest(ids, mask), SamplingConfig(max_new_tokens=T, temperature=0.0,
                                                                  n_samples_per_prompt=K))
    # Stop at j = L-2 -> length L-1 (stop included); L=12 would stop at j=10 > T: truncated at T.
    want_len = [2, 2, 6, 6, 3, 3, 8, 8]
    assert res.response_lengths.tolist() == want_len
    assert res.truncated.tolist() == [False] * 6 + [True] * 2
    assert res.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    Tr = res.response_ids.shape[1]
    assert Tr == T
    for i, n in enumerate(want_len):
        expect = [10 + j for j in range(n)]
        if not res.truncated[i]:
            expect[-1] = lm.STOP
        assert res.response_ids[i].tolist() == expect + [P] * (Tr - n)
        assert res.response_mask[i].tolist() == [1] * n + [0] * (Tr - n)
    # RolloutBatch layout: [left-padded prompt | right-padded response].
    assert res.input_ids.shape == (8, Tp + Tr)
    assert torch.equal(res.input_ids[:, :Tp], ids.repeat_interleave(K, 0))
    assert torch.equal(res.input_ids[:, Tp:], res.response_ids)
    assert torch.equal(res.attention_mask, torch.cat([mask.repeat_interleave(K, 0), res.response_mask], 1))
    assert res.response_start_idx.tolist() == [Tp] * 8
    assert res.stats["tokens"] == sum(want_len)
    assert res.stats["decode_steps"] == T - 1
    if compact_fraction == 0.0:  # finished rows cost nothing after they end
        assert res.stats["row_steps"] == sum(n - 1 for n in want_len)


def test_sampling_is_seeded():
    model, tok = tiny(varied_bias()[0])
    req = request(tok)
    s = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20, n_samples_per_prompt=4)

    def run(seed, step=0):
        roll = TapoRollout(model, tok, stops(tok), tok.pad_token_id, seed=seed)
        roll.sync_weights(step)
        return roll.generate(req, s).input_ids

    a, b = run(0), run(0)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(1))
    assert not torch.equal(a, run(0, step=1))
    roll = TapoRollout(model, tok, stops(tok), tok.pad_token_id, seed=0)
    roll.sync_weights(0)
    first, second = roll.generate(req, s).input_ids, roll.generate(req, s).input_ids
    assert torch.equal(first, a) and not torch.equal(first, second)  # each call draws fresh samples
    # K samples of one prompt differ from each other under sampling.
    assert not torch.equal(a[0], a[1])


def test_k_samples_layout_greedy():
    model, tok = tiny(varied_bias()[0])
    req = request(tok)
    roll = TapoRollout(model, tok, stops(tok), tok.pad_token_id)
    one = roll.generate(req, SamplingConfig(max_new_tokens=12, temperature=0.0))
    three = roll.generate(req, SamplingConfig(max_new_tokens=12, temperature=0.0, n_samples_per_prompt=3))
    B = len(PROMPTS)
    assert three.batch_size == 3 * B
    assert three.prompt_index.tolist() == [i for i in range(B) for _ in range(3)]
    # Shared prefill + repeat_interleave: under greedy the K copies equal the single sample.
    assert torch.equal(three.input_ids, one.input_ids.repeat_interleave(3, 0))
    assert torch.equal(three.response_lengths, one.response_lengths.repeat_interleave(3))


def test_sample_next_token_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    greedy = SamplingConfig(max_new_tokens=1, temperature=0.0)
    assert sample_next_token(logits, greedy, None).tolist() == [1, 0]
    for s in (SamplingConfig(max_new_tokens=1, top_k=1), SamplingConfig(max_new_tokens=1, top_p=0.01)):
        for _ in range(20):
            assert sample_next_token(logits, s, g).tolist() == [1, 0]
    top2 = SamplingConfig(max_new_tokens=1, top_k=2, temperature=5.0)
    seen = {tuple(sample_next_token(logits, top2, g).tolist()) for _ in range(200)}
    assert {a for a, _ in seen} == {1, 2} and {b for _, b in seen} == {0, 3}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero3_engine():
    import deepspeed
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="gloo")
    model, tok = tiny(varied_bias()[0])
    plain = copy.deepcopy(model)
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=cfg)
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters())
    return engine, plain, tok


def test_zero3_engine_matches_plain_module(zero3_engine):
    engine, plain, tok = zero3_engine
    req = request(tok)
    s = SamplingConfig(max_new_tokens=16, temperature=0.0, n_samples_per_prompt=2)
    want = TapoRollout(plain, tok, stops(tok), tok.pad_token_id).generate(req, s)
    once = TapoRollout(engine, tok, stops(tok), tok.pad_token_id, gather="once",
                       module_factory=factory(plain.config))
    per_step = TapoRollout(engine, tok, stops(tok), tok.pad_token_id, gather="per_step")
    once.sync_weights(0)
    got = once.generate(req, s)
    assert once._copy is not None and not any(hasattr(p, "ds_id") for p in once._copy.parameters())
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.response_mask, want.response_mask)
    assert torch.equal(per_step.generate(req, s).input_ids, want.input_ids)

    # One training step changes the weights; the copy must follow (re-gathered because the
    # engine's global_steps moved, even without an explicit sync_weights) and stay reused.
    copy_before = once._copy
    ids = req.prompt_ids[:1]
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    after = once.generate(req, s)
    assert once._copy is copy_before
    assert torch.equal(after.input_ids, per_step.generate(req, s).input_ids)
    assert not torch.equal(after.input_ids, want.input_ids)


def test_two_rank_zero3_lockstep():
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), __file__]
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("LOCKSTEP_OK") == 2, out[-4000:]


def _two_rank_worker():
    """Each rank: its own prompts (rank 0's all end early, rank 1 has a row that runs to the
    limit), so in "per_step" mode rank 0 must keep stepping a dummy row. Results must equal
    the plain module's on the same rank, in both gather modes."""
    import deepspeed
    import deepspeed.comm as dist
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    bias, lengths = varied_bias()
    model, tok = tiny(bias)
    plain = copy.deepcopy(model)
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=cfg)
    by_length = sorted(range(len(PROMPTS)), key=lambda i: lengths[i])
    mine = by_length[:2] if rank == 0 else by_length[-2:]  # rank 1 holds a row that runs to T
    req = request(tok, [PROMPTS[i] for i in mine])
    s = SamplingConfig(max_new_tokens=T, temperature=0.0, n_samples_per_prompt=2)
    want = TapoRollout(plain, tok, stops(tok), tok.pad_token_id).generate(req, s)
    steps = torch.tensor([want.stats["decode_steps"]])
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    assert steps.item() > want.stats["decode_steps"] or rank == 1, "rank 0 should finish first"
    for gather in ("per_step", "once"):
        roll = TapoRollout(engine, tok, stops(tok), tok.pad_token_id, gather=gather,
                           module_factory=factory(plain.config))
        roll.sync_weights(0)
        got = roll.generate(req, s)
        assert torch.equal(got.input_ids, want.input_ids), (rank, gather)
        if gather == "per_step":  # lockstep: every rank ran as many steps as the slowest
            assert got.stats["decode_steps"] == steps.item()
    print(f"LOCKSTEP_OK rank {rank} own steps {want.stats['decode_steps']:.0f} ran {steps.item():.0f}", flush=True)


if __name__ == "__main__":
    _two_rank_worker()


def test_decoding_bypasses_zero3_linear(zero3_engine, monkeypatch):
    """ZeRO-3 replaces torch.nn.functional.linear process-wide; decoding (no autograd graph) must run on
    torch's own linear, and the replacement must be back in place afterwards for training."""
    import torch.nn.functional as F

    from tapo_ds.plain_linear import plain_linear

    engine, plain, tok = zero3_engine
    calls = []
    patched = F.linear

    def counting(*args, **kwargs):
        calls.append(1)
        return patched(*args, **kwargs)

    monkeypatch.setattr(F, "linear", counting)
    roll = TapoRollout(engine, tok, stops(tok), tok.pad_token_id, gather="once", module_factory=factory(plain.config))
    roll.sync_weights(0)
    got = roll.generate(request(tok), SamplingConfig(max_new_tokens=8, temperature=0.0))
    assert got.response_lengths.sum() > 0 and calls == []
    assert F.linear is counting
    engine(input_ids=request(tok).prompt_ids[:1])  # a forward that builds a graph keeps the replacement
    assert calls
    with pytest.raises(RuntimeError, match="no_grad"), plain_linear():
        pass


class _EchoFollowUps:
    """After prompt q's samples end, start one follow-up: prompt q's tokens then its first sample."""

    def __init__(self, tok, sampling, delay_steps=0):
        self.tok, self.sampling, self.delay = tok, sampling, delay_steps
        self.done_groups, self.pending, self.started = [], [], []
        self.calls = 0

    def group_done(self, prompt, token_ids, truncated):
        self.done_groups.append((prompt, token_ids, truncated))
        ids = self.tok(PROMPTS[prompt]).input_ids + token_ids[0][:3]
        self.pending.append((self.calls + self.delay, ids))

    def ready(self, block):
        self.calls += 1
        now = [ids for due, ids in self.pending if block or due <= self.calls]
        self.pending = [(due, ids) for due, ids in self.pending if not (block or due <= self.calls)]
        self.started += now
        return now


@pytest.mark.parametrize("delay_steps", [0, 5])
def test_followups_join_the_running_batch(delay_steps):
    """Greedy: the request's samples are those of plain generate, every follow-up is what generate gives
    its prompt alone, each group is reported once with its own samples, and follow-ups really joined a
    running batch (not only after it ended)."""
    bias, _ = varied_bias()
    model, tok = tiny(bias)
    roll = TapoRollout(model, tok, stops(tok), tok.pad_token_id)
    s = SamplingConfig(max_new_tokens=T, temperature=0.0, n_samples_per_prompt=2)
    want = roll.generate(request(tok), s)
    follow = _EchoFollowUps(tok, SamplingConfig(max_new_tokens=T + 6, temperature=0.0), delay_steps)
    got, extra = roll.generate_with_followups(request(tok), s, follow)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.response_mask, want.response_mask)
    assert sorted(q for q, _, _ in follow.done_groups) == list(range(len(PROMPTS)))
    for q, ids, truncated in follow.done_groups:
        for j in range(2):
            n = int(want.response_lengths[2 * q + j])
            assert ids[j] == want.response_ids[2 * q + j, :n].tolist()
            assert truncated[j] == bool(want.truncated[2 * q + j])
    assert len(extra.token_ids) == len(follow.started) == len(PROMPTS) and extra.joins >= 1
    alone = SamplingConfig(max_new_tokens=T + 6, temperature=0.0)
    for ids, out, cut in zip(follow.started, extra.token_ids, extra.truncated):
        ref = roll.generate(RolloutRequest(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)), alone)
        assert out == ref.response_ids[0, :int(ref.response_lengths[0])].tolist()
        assert cut == bool(ref.truncated[0])
