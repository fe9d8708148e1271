"""Our decode loop against transformers' continuous batching (``generate_batch``), same prompts and sampling.

    .venv/bin/python bench/continuous_batching.py             # ~2 min on 2 CPU cores
    .venv/bin/python bench/continuous_batching.py --rounds 5 --samples 16

Before writing a scheduler of our own we measured the one transformers ships: the shipped miniature
checkpoint, the first ``--questions`` held-out problems of the synthetic task rendered with the chat
template, K samples each, temperature 1.0, ``--max-new-tokens``. ``TapoRollout`` prefills each prompt
once and decodes its K samples with finished rows leaving the batch; ``generate_batch`` gets every
prompt K times (its manager schedules them on a paged cache; no warm-up, which only captures CUDA
graphs). Alternating rounds, each system's median wall time and generated tokens; the ratio (tokens/s
of ours over theirs) is printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "miniature-coldstart"))
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    from deepspeed.runtime.rollout.base import RolloutRequest, SamplingConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from tapo_ds.batch import left_pad
    from tapo_ds.data import encode, render_chat
    from tapo_ds.modeling import stop_token_ids
    from tapo_ds.rollout import TapoRollout

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    rows = [json.loads(x) for x in (ROOT / "data" / "synthetic" / "test.jsonl").read_text().splitlines()]
    prompts = [encode(tok, render_chat(tok, r["problem"], {"enable_thinking": False})) for r in rows[:a.questions]]
    stops = stop_token_ids(tok, model.config)
    rollout = TapoRollout(model, tok, stops, tok.pad_token_id, seed=0)
    sampling = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=1.0, n_samples_per_prompt=a.samples)
    gen_config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=a.max_new_tokens,
                                  eos_token_id=stops, pad_token_id=tok.pad_token_id)

    def ours() -> int:
        ids, mask = left_pad(prompts, tok.pad_token_id)
        return int(rollout.generate(RolloutRequest(ids, mask), sampling).response_lengths.sum())

    def theirs() -> int:
        out = model.generate_batch([q for q in prompts for _ in range(a.samples)], generation_config=gen_config,
                                   continuous_batching_config=ContinuousBatchingConfig(), warmup=False)
        return sum(len(r.generated_tokens) for r in out.values())

    runs: dict[str, list[tuple[float, int]]] = {"tapo-ds TapoRollout": [], "transformers generate_batch": []}
    systems = list(zip(runs, (ours, theirs)))
    for r in range(a.rounds):
        for name, fn in (systems if r % 2 == 0 else systems[::-1]):
            t0 = time.perf_counter()
            n = fn()
            runs[name].append((time.perf_counter() - t0, n))
            print(f"round {r + 1} {name}: {runs[name][-1][0]:.2f} s, {n} tokens", flush=True)
    rate = {}
    print(f"\n{a.questions} prompts x {a.samples} samples, {a.max_new_tokens} new tokens, T 1.0, {a.threads} threads")
    for name, xs in runs.items():
        wall, tokens = statistics.median(w for w, _ in xs), statistics.median(n for _, n in xs)
        rate[name] = statistics.median(n / w for w, n in xs)
        print(f"{name:28s} median {wall:.2f} s, {tokens:.0f} tokens, {rate[name]:.0f} tokens/s")
    print(f"ratio tokens/s, tapo-ds / transformers continuous batching: {rate['tapo-ds TapoRollout'] / rate['transformers generate_batch']:.2f}x")


if __name__ == "__main__":
    main()
