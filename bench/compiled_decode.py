"""Would a compiled decode step make the rollout cheaper? One decode step of a model, eager with the decode
loop's cache (:mod:`tapo_ds.growing_cache`) vs ``torch.compile`` (inductor) over transformers' ``StaticCache``
(fixed shapes, so one graph serves every step), greedy, same prompts, side by side.

A compiled graph removes Python dispatch between the step's dozens of small kernels and may fuse some of
them; this measures whether that makes the step cheaper here. The compile time of the first round is
reported apart and left out of the step times.

    .venv/bin/python bench/compiled_decode.py                          # the shipped miniature checkpoint
    .venv/bin/python bench/compiled_decode.py --rows 16 --new-tokens 128 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, StaticCache

from tapo_ds.growing_cache import growing_cache


def decode(forward, cache, ids: torch.Tensor, new_tokens: int) -> tuple[list[float], torch.Tensor]:
    """Prefill ``ids`` then ``new_tokens`` greedy steps; the seconds of each step and the tokens."""
    prompt = ids.shape[1]
    times, out = [], []
    with torch.no_grad():
        logits = forward(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt),
                         use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(new_tokens):
            t0 = time.perf_counter()
            logits = forward(input_ids=tok, past_key_values=cache,
                             cache_position=torch.tensor([prompt + i]), use_cache=True).logits
            tok = logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
            out.append(tok)
    return times, torch.cat(out, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/miniature-coldstart")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    ids = torch.randint(5, model.config.vocab_size, (a.rows, a.prompt_tokens))
    length = a.prompt_tokens + a.new_tokens + 8
    compiled = torch.compile(model.forward, dynamic=False)
    t0 = time.perf_counter()
    decode(compiled, StaticCache(config=model.config, max_cache_len=length), ids, 2)
    print(f"compile (prefill and decode graphs): {time.perf_counter() - t0:.1f} s")
    eager_ms, compiled_ms = [], []
    for r in range(a.rounds):  # alternated, so drift in the machine's load hits both
        te, out_e = decode(model.forward, growing_cache(model.config), ids, a.new_tokens)
        tc, out_c = decode(compiled, StaticCache(config=model.config, max_cache_len=length), ids, a.new_tokens)
        same = (out_e == out_c).float().mean().item()
        eager_ms.append(1000 * statistics.median(te))
        compiled_ms.append(1000 * statistics.median(tc))
        print(f"round {r + 1}: ms per decode step, eager {eager_ms[-1]:.2f}, compiled {compiled_ms[-1]:.2f} "
              f"(greedy tokens equal: {same:.1%})")
    e, c = statistics.median(eager_ms), statistics.median(compiled_ms)
    print(f"{a.rows} rows, prompt {a.prompt_tokens}, {a.new_tokens} new tokens, {a.threads} threads: "
          f"median ms per step eager {e:.2f}, compiled {c:.2f}; compiled / eager time: {c / e:.2f}x")


if __name__ == "__main__":
    main()
