"""The decode loop's KV cache: appending in place (``tapo_ds.growing_cache``) vs transformers' concatenation.

    .venv/bin/python bench/kv_cache.py                   # ~3 min on 2 CPU cores
    .venv/bin/python bench/kv_cache.py --model 30m --max-new-tokens 96 --rounds 3

``TapoRollout.generate`` over the first ``--questions`` held-out synthetic problems (chat template), K
samples each, temperature 1.0, with the same seed in both arms: ``grow`` is the shipped decode loop,
``cat`` the same loop with transformers' ``DynamicCache`` (every append copies the whole cache). Both
sample the same tokens (checked: the arms' outputs must be identical, else the script stops). The
model is the shipped miniature checkpoint, or with ``--model 30m`` a ~30M-parameter Qwen3 built from a
config (random weights: its samples rarely stop, so rows run to ``--max-new-tokens``). Alternating
rounds; per arm the median wall time and tokens/s; the ratio (tokens/s of grow over cat) is printed last.
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
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "miniature-coldstart"),
                   help="a checkpoint folder, or 30m")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    from deepspeed.runtime.rollout.base import RolloutRequest, SamplingConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, Qwen3Config, Qwen3ForCausalLM

    from tapo_ds import decode_loop
    from tapo_ds.batch import left_pad
    from tapo_ds.data import encode, render_chat
    from tapo_ds.growing_cache import growing_cache
    from tapo_ds.modeling import stop_token_ids
    from tapo_ds.rollout import TapoRollout

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ckpt = ROOT / "checkpoints" / "miniature-coldstart"
    tok = AutoTokenizer.from_pretrained(ckpt if a.model == "30m" else a.model)
    if a.model == "30m":
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1536,
                                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                             head_dim=64, tie_word_embeddings=True)).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    params = sum(x.numel() for x in model.parameters()) / 1e6
    rows = [json.loads(x) for x in (ROOT / "data" / "synthetic" / "test.jsonl").read_text().splitlines()]
    prompts = [encode(tok, render_chat(tok, r["problem"], {"enable_thinking": False})) for r in rows[:a.questions]]
    rollout = TapoRollout(model, tok, stop_token_ids(tok, model.config), tok.pad_token_id, seed=0)
    sampling = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=1.0, n_samples_per_prompt=a.samples)
    arms = {"grow": growing_cache, "cat": lambda config: DynamicCache(config=config)}

    def run(arm: str):
        decode_loop.growing_cache = arms[arm]
        try:
            rollout._calls = 0  # the same sampling stream in both arms
            ids, mask = left_pad(prompts, tok.pad_token_id)
            t0 = time.perf_counter()
            res = rollout.generate(RolloutRequest(ids, mask), sampling)
            return time.perf_counter() - t0, res
        finally:
            decode_loop.growing_cache = growing_cache

    runs: dict[str, list[tuple[float, int]]] = {arm: [] for arm in arms}
    run("grow")  # warm-up
    for r in range(a.rounds):
        outs = {}
        for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            wall, res = run(arm)
            outs[arm] = res.response_ids
            runs[arm].append((wall, int(res.response_lengths.sum())))
            print(f"round {r + 1} {arm}: {wall:.2f} s, {runs[arm][-1][1]} tokens", flush=True)
        if not torch.equal(outs["grow"], outs["cat"]):
            raise SystemExit("the arms sampled different tokens: the caches are not equivalent")
    print(f"\n{params:.1f}M-param model, {a.questions} prompts x {a.samples} samples, {a.max_new_tokens} new tokens, "
          f"T 1.0, {a.threads} threads; identical outputs in every round")
    rate = {}
    for arm, xs in runs.items():
        rate[arm] = statistics.median(n / w for w, n in xs)
        print(f"{arm:5} median {statistics.median(w for w, _ in xs):.2f} s, {statistics.median(n for _, n in xs):.0f} "
              f"tokens, {rate[arm]:.0f} tokens/s")
    print(f"\ntokens/s, in-place KV appends / concatenation: {rate['grow'] / rate['cat']:.2f}x")


if __name__ == "__main__":
    main()
