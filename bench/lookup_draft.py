"""TAPO's construction decode with and without prompt-lookup drafts, side by side (issue 9).

    .venv/bin/python bench/lookup_draft.py                      # defaults: ~2 min on 2 CPU cores
    .venv/bin/python bench/lookup_draft.py --questions 32 --rounds 5 --draft-tokens 8 --min-match 3

The shipped miniature cold start answers held-out synthetic questions (K samples each, the RL rollout
settings of ``--config``); TAPO's own DCS pairs its wrong and right answers and renders the construction
prompts; then the step's constructions are decoded in one call, as the trainer does, alternately without
drafts and with them (``tapo.lookup_draft_tokens`` / ``tapo.lookup_min_match``), ``--rounds`` times each,
the order flipped every round. Both arms sample from the same distribution (the drafts are verified by
speculative sampling), so their mean construction lengths and parse rates must agree within noise; what
differs is the number of forwards. A third arm, ``plain_cat``, decodes without drafts on transformers'
concatenating ``DynamicCache`` instead of the decode loop's in-place one (``tapo_ds.growing_cache``), on the
same long construction prompts. Prints per arm: median wall time, generated tokens, forwards, draft tokens
proposed and accepted; then the cache ratio, and LAST the ratio of median wall times (lookup / plain).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "checkpoints/miniature-coldstart"))
    ap.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    ap.add_argument("--test-file", default=str(ROOT / "data/synthetic/test.jsonl"))
    ap.add_argument("--questions", type=int, default=32, help="held-out questions answered (the step's B)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--min-match", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from tapo_ds import modeling
    from tapo_ds.config import load_config
    from tapo_ds.data import encode, load_examples, prepare, render_chat
    from tapo_ds.generation import generate
    from tapo_ds.lookup_draft import LookupDraft
    from tapo_ds.prefilter import sample_and_grade
    from tapo_ds.rollout import TapoRollout
    from tapo_ds.runtime import sampling_of
    from tapo_ds.synthetic.mix import synthetic_grader
    from tapo_ds.trajectory import build_requests, load_template, parse_outputs, select_pairs

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_config(args.config, [])
    d, r, t = cfg.data, cfg.rollout, cfg.tapo
    tok = modeling.load_tokenizer(args.model)
    model = modeling.load_model(args.model).eval()
    rollout = TapoRollout(model, tok, modeling.stop_token_ids(tok, model.config), tok.pad_token_id, seed=args.seed)
    rollout.sync_weights(0)
    examples = load_examples([args.test_file], d.problem_field, d.answer_field, d.split, args.questions)
    prompted, _ = prepare(examples, tok, d.prompt_template, cfg.model.chat_template_kwargs, d.max_prompt_tokens)

    class Grader:
        def grade(self, pairs, require_box=True, timeout=None):
            return type("G", (), {"correct": synthetic_grader(pairs)})()

    texts, rewards = sample_and_grade(prompted, rollout=rollout, grader=Grader(), tokenizer=tok,
                                      sampling=sampling_of(r, r.samples_per_question),
                                      batch_questions=len(prompted), device="cpu")
    flat = [x for resp in texts for x in resp]
    groups = [g for g, resp in enumerate(texts) for _ in resp]
    sel = select_pairs([x for rew in rewards for x in rew], groups, n_pos=t.n_pos, n_neg=t.n_neg, m_max=t.m_max,
                       rng=random.Random(args.seed))

    def count(prompt: str) -> int:
        return len(encode(tok, render_chat(tok, prompt, cfg.model.chat_template_kwargs)))

    reqs = build_requests(sel.pairs, [q.example.problem for q in prompted], flat,
                          template=load_template(t.template or t.construction), budget_tokens=t.max_prompt_tokens,
                          count_tokens=count)
    prompts = [encode(tok, render_chat(tok, p, cfg.model.chat_template_kwargs)) for p in reqs.prompts]
    sampling = sampling_of(t, 1)
    print(f"model {args.model}: {len(prompted)} questions x {r.samples_per_question} samples, "
          f"{len(sel.candidates) if hasattr(sel, 'candidates') else '?'} DCS candidates, {len(prompts)} constructions "
          f"of up to {sampling.max_new_tokens} tokens (T {sampling.temperature}), prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens; threads {args.threads}")
    if not prompts:
        raise SystemExit("no construction prompts: no question had both right and wrong answers")

    from transformers import DynamicCache

    from tapo_ds import decode_loop
    from tapo_ds.growing_cache import growing_cache

    arms = {"plain": None, "plain_cat": None, "lookup": LookupDraft(tokens=args.draft_tokens, min_match=args.min_match,
                                                 max_match=max(16, args.min_match))}
    rows: dict[str, list[dict]] = {a: [] for a in arms}
    generate(rollout, tok, prompts[:2], sampling, lookup=None)  # warm-up
    for rnd in range(args.rounds):
        order = list(arms) if rnd % 2 == 0 else list(reversed(arms))
        for arm in order:
            t0 = time.perf_counter()
            decode_loop.growing_cache = ((lambda config: DynamicCache(config=config)) if arm == "plain_cat"
                                         else growing_cache)
            try:
                res = rollout.generate(_request(tok, prompts), sampling, arms[arm])
            finally:
                decode_loop.growing_cache = growing_cache
            wall = time.perf_counter() - t0
            outs = [tok.decode(res.response_ids[i, :n].tolist(), skip_special_tokens=True)
                    for i, n in enumerate(res.response_lengths.tolist())]
            parsed = parse_outputs(reqs, outs)
            rows[arm].append({"wall": wall, **{k: res.stats[k] for k in ("tokens", "decode_steps", "draft_tokens",
                                                                          "draft_accepted")},
                              "parsed": len(parsed.items) / len(outs)})
    print(f"\n{'arm':8} {'median s':>9} {'tokens':>8} {'forwards':>9} {'tok/s':>8} {'drafted':>8} "
          f"{'accepted':>9} {'parsed':>7}")
    med = {}
    for arm, rs in rows.items():
        med[arm] = statistics.median(x["wall"] for x in rs)
        tokens = statistics.mean(x["tokens"] for x in rs)
        print(f"{arm:8} {med[arm]:9.2f} {tokens:8.0f} {statistics.mean(x['decode_steps'] for x in rs):9.0f} "
              f"{tokens / med[arm]:8.0f} {statistics.mean(x['draft_tokens'] for x in rs):8.0f} "
              f"{statistics.mean(x['draft_accepted'] for x in rs):9.0f} "
              f"{statistics.mean(x['parsed'] for x in rs):7.1%}")
    print(f"\nconstruction decode wall time, concatenating / in-place KV cache: {med['plain_cat'] / med['plain']:.2f}x")
    print(f"\nconstruction decode wall time, lookup / plain (median of {args.rounds} rounds): "
          f"{med['lookup'] / med['plain']:.2f}x")


def _request(tok, prompts):
    from deepspeed.runtime.rollout.base import RolloutRequest

    from tapo_ds.batch import left_pad
    ids, mask = left_pad(prompts, tok.pad_token_id)
    return RolloutRequest(ids, mask)


if __name__ == "__main__":
    main()
