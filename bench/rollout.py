"""Useful tokens/s of TapoRollout vs DeepSpeed's HybridEngineRollout on one ZeRO-3 engine.

    .venv/bin/python bench/rollout.py              # 1 rank (gloo), ~1 min on 2 CPU cores
    .venv/bin/python bench/rollout.py --world 2    # 2 ranks: re-launches itself through
                                                   # `deepspeed --num_gpus 2 bench/rollout.py --worker ...`

Same engine, same prompts, same max_new_tokens and sampling (temperature 1) for both.
"Useful" tokens are response tokens up to and including the first stop token; the
hybrid engine decodes every row to max_new_tokens, TapoRollout drops rows as they end.

The model is a randomly initialised Qwen2 (~33M parameters by default), so response
lengths would otherwise be arbitrary: its lm_head gets a bias, zero except on the stop
token, calibrated so that P(stop) ~= --stop-prob per token (random-weight logits are near
uniform). Lengths are then roughly geometric, mean ~ 35 % of max, and most batches still
contain a row that runs to the limit, as with real policies. The ratio is printed LAST.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
# Reuse the one-time DeepSpeed op build (shm comm) across runs, inside the ignored cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import torch  # noqa: E402

PAD, STOP = 0, 1
T_START = time.perf_counter()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=1, help="ranks (2 re-launches through the deepspeed launcher)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per rank")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (K)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="128 (1 rank), 64 (2 ranks)")
    p.add_argument("--repeats", type=int, default=None, help="3 (1 rank), 2 (2 ranks)")
    p.add_argument("--stop-prob", type=float, default=None,
                   help="target per-token P(stop): 0.02 (1 rank), 0.04 (2 ranks); mean length ~36 %% of max")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--gather", default="once", choices=["once", "per_step"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ablation", action="store_true", help="skip the tapo_keep_rows variant")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    # 2 ranks share 2 cores and the hybrid engine all-gathers over gloo at every decode
    # step (~4x slower per token than 1 rank), so halve the budget to stay within ~3 min;
    # the doubled stop probability keeps the same mean/max length ratio.
    one = args.world == 1
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if one else 64
    if args.repeats is None:
        args.repeats = 3 if one else 2
    if args.stop_prob is None:
        args.stop_prob = 0.02 * 128 / args.max_new_tokens
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(args):
    import transformers
    cfg = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=STOP)
    model = transformers.Qwen2ForCausalLM(cfg)
    # The stop-token bias lives in a real lm_head bias so that both rollouts (and the
    # ZeRO-3 gather) see it as an ordinary parameter.
    head = torch.nn.Linear(args.hidden, args.vocab, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    model.lm_head = head
    return model


def calibrate_stop_bias(model, prompt_ids, prompt_mask, p: float) -> float:
    """Bias b with softmax(logits + b*e_stop)[stop] ~= p, from the prompt positions' logits."""
    with torch.no_grad():
        logits = model(input_ids=prompt_ids, attention_mask=prompt_mask).logits.float()
    logits = logits[prompt_mask.bool()]
    others = torch.cat([logits[:, :STOP], logits[:, STOP + 1:]], dim=1).logsumexp(dim=1)
    return float((math.log(p / (1 - p)) + others - logits[:, STOP]).mean())


def make_prompts(args, rank: int):
    g = torch.Generator().manual_seed(1000 + rank)
    lengths = torch.randint(16, 49, (args.prompts,), generator=g)
    T = int(lengths.max())
    ids = torch.full((args.prompts, T), PAD, dtype=torch.long)
    mask = torch.zeros((args.prompts, T), dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):  # left padding
        ids[i, T - n:] = torch.randint(2, args.vocab, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


def main():
    args = parse_args()
    if args.world > 1 and not args.worker:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(args.world), "--master_port", str(free_port()),
               __file__, "--worker"] + [a for a in sys.argv[1:]]
        print("+", " ".join(cmd), flush=True)
        sys.exit(subprocess.call(cmd))
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores

    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.runtime.rollout import HybridEngineRollout, RolloutRequest, SamplingConfig

    from tapo_ds.rollout import TapoRollout

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    log = print if rank == 0 else (lambda *a, **k: None)

    torch.manual_seed(args.seed)
    model = build_model(args)
    ids, mask = make_prompts(args, rank)
    bias = calibrate_stop_bias(model, *make_prompts(args, 0), args.stop_prob)  # same on every rank
    model.lm_head.bias.data[STOP] = bias
    n_params = sum(p.numel() for p in model.parameters())
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5),
                                      config=ds_config)
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=STOP)  # all HybridEngineRollout reads
    request = RolloutRequest(ids, mask)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0,
                              n_samples_per_prompt=args.samples)
    hybrid = HybridEngineRollout(engine, tokenizer)  # default settings: HF generate to max_new_tokens

    def tapo_rollout(**kw):
        return TapoRollout(engine, tokenizer, stop_token_ids=[STOP], pad_token_id=PAD, seed=args.seed,
                           gather=args.gather, module_factory=lambda: build_model(args), **kw)

    def hybrid_fn(step, sampling):
        out = hybrid.generate(request, sampling)
        return int(out.attention_mask[:, ids.shape[1]:].sum()), out.batch_size

    def tapo_fn(roll):
        def fn(step, sampling):
            roll.sync_weights(step)  # the gather is part of the rollout phase's cost
            out = roll.generate(request, sampling)
            return int(out.response_lengths.sum()), out.batch_size
        return fn

    # tapo_keep_rows: same engine, gather and early stop, but never drops finished rows
    # (an ablation: what row dropping itself is worth here).
    variants = {"hybrid_engine": hybrid_fn, "tapo": tapo_fn(tapo_rollout()),
                "tapo_keep_rows": tapo_fn(tapo_rollout(compact_fraction=float("inf")))}
    if args.no_ablation:
        del variants["tapo_keep_rows"]
    log(f"model: Qwen2 random init, {n_params / 1e6:.1f}M params, hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}, fp32, ZeRO-3 (hybrid_engine.enabled false), {world} rank(s), "
        f"{torch.get_num_threads()} thread(s)/rank")
    log(f"workload/rank: {args.prompts} prompts (16-48 random tokens, left-padded) x {args.samples} samples, "
        f"max_new_tokens {args.max_new_tokens}, temperature 1.0; tapo gather={args.gather}")
    log(f"realistic lengths: lm_head bias {bias:+.2f} on the stop token -> P(stop) ~ {args.stop_prob:.3f}/token")

    def timed(fn, step):
        dist.barrier()
        t0 = time.perf_counter()
        useful, rows = fn(step, sampling)
        wall = time.perf_counter() - t0
        # A phase lasts as long as its slowest rank; useful tokens add up across ranks.
        t = torch.tensor([wall, useful, rows], dtype=torch.float64)
        w = t[:1].clone()
        dist.all_reduce(w, op=dist.ReduceOp.MAX)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t[1]) / float(w[0]), float(t[1]) / float(t[2]), float(w[0])

    # Warm-up (allocator, first-call paths, the inference copy's construction), not timed.
    warm = SamplingConfig(max_new_tokens=4, temperature=1.0, n_samples_per_prompt=args.samples)
    for fn in variants.values():
        fn(-1, warm)

    res = {k: [] for k in variants}
    for r in range(args.repeats):
        torch.manual_seed(args.seed + r)  # HF generate samples from the global RNG
        order = list(variants.items())
        for name, fn in (order if r % 2 == 0 else order[::-1]):  # alternate to cancel drift
            tps, mean_len, wall = timed(fn, r)
            res[name].append((tps, mean_len, wall))
            log(f"  repeat {r} {name:14s} useful tok/s {tps:8.1f}  mean length {mean_len:5.1f}  wall {wall:6.2f}s")
    med = {k: statistics.median(x[0] for x in v) for k, v in res.items()}
    for k, v in res.items():
        log(f"median {k:14s} useful tok/s {med[k]:8.1f}  mean length "
            f"{statistics.mean(x[1] for x in v):5.1f} / {args.max_new_tokens}  "
            f"wall {statistics.median(x[2] for x in v):.2f}s")
    if "tapo_keep_rows" in med:
        log(f"ratio (tapo_keep_rows / hybrid_engine): {med['tapo_keep_rows'] / med['hybrid_engine']:.2f}  "
            f"(row dropping alone: tapo / tapo_keep_rows {med['tapo'] / med['tapo_keep_rows']:.2f})")
    log(f"bench wall time {time.perf_counter() - T_START:.0f}s (startup, warm-up and {args.repeats} repeats)")
    log(f"ratio (tapo / hybrid_engine useful tok/s): {med['tapo'] / med['hybrid_engine']:.2f}", flush=True)


if __name__ == "__main__":
    main()
