"""Median step time of TAPO vs GRPO at equal B, K, model and response lengths (issue 3, part 8).

    .venv/bin/python bench/tapo_overhead.py                 # defaults: ~2.5 min on 2 CPU cores
    .venv/bin/python bench/tapo_overhead.py --candidate-frac 0.5 --template builtin --decode-model engine

Both arms run the real step (``RLTrainer.step``: rollout -> reward -> construct ->
advantages -> update) on ONE DeepSpeed ZeRO-3 engine holding a randomly initialised tiny
Qwen3 (``configs/tiny.yaml``; character-level tokenizer, so a token is about a character).
A random model cannot answer arithmetic nor write constructions, so the policy is scripted
(``tapo_ds.scripted.ScriptedRollout``) and still pays the real decode cost: a model of the
same size is run token by token, KV-cached, over every scripted token (prompt prefill
included), for the rollout and, in TAPO, for the constructions. Everything else is the
production code: grading pool (math-verify), DCS, construction prompt, parsing,
verification, assembly, decoupled advantages, OTS, loss and optimizer step.

The scripted policy (deterministic in the prompt text, so both arms see identical rollouts):

* each question gets ``--right`` correct answers out of K (default 3 of 8: with n_pos = 2,
  n_neg = 4, m_max = 4 every question is a candidate and gives 4 pairs, the heaviest
  case); with ``--candidate-frac f < 1`` only a fraction f of the questions are
  candidates, the others are all right, all wrong or 1 right (not eligible);
* responses are step-by-step text of ``--min-len``..``--max-len`` tokens (uniform) ending in
  ``Final Answer: \\boxed{..}``, the wrong ones with an off-by-one answer;
* a construction is a one-line analysis, then the wrong response's steps word for word up
  to its "first mistake" (30-70 % into it), "Wait, let me double-check step j: ...", a
  correction, and a final answer, right with probability ``--verify-rate`` (wrong ones are
  kept as negatives, the default); the reconstruction is ~1.2x the wrong response. It
  parses with probability ``--parse-rate`` (paper: 80-90 %); an unparsable one has the
  same text without the ``<reconstruction>`` tags.

Two knobs decide what the construction phase costs and are printed with the result:

* ``--template scaled`` (default): the built-in ``micro`` template with its instructions
  cut to ``--template-ratio`` (0.4) x the mean response length. The built-in text is
  ~2,000 characters, i.e. ~450 Qwen3 tokens next to responses of ~1,000+ tokens in the
  paper's setting; with this character-level tokenizer it is ~2,000 tokens next to
  responses of ~130, which would make every construction prompt ~15x a response and
  overstate construction prefill and attention by an order of magnitude.
  ``--template builtin`` measures that case anyway.
* ``--decode-model copy`` (default): the scripted rollout decodes with a plain module
  (no ZeRO-3 hooks), as ``TapoRollout`` does with ``gather: once``. ``engine`` decodes
  through the ZeRO-3 engine's module (a parameter fetch per layer per token).

The scripted rollout does not drop finished rows (``TapoRollout`` does): every generate call
decodes all rows to the longest one, in both arms.

Arms alternate (ABAB..., the order flipped every round) after one untimed warm-up step each;
at round r both arms get the same questions. Per-phase medians are printed for both arms,
with the training work of each (sequences, tokens), so that the step-time ratio can be read
against the extra samples TAPO inherently trains on. The ratio is printed LAST.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Reuse the one-time DeepSpeed op builds across runs, inside the ignored cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

T_START = time.perf_counter()
PHASES = ("rollout", "reward", "construct", "advantages", "update", "step")
QUESTION_RE = re.compile(r"What is (-?\d+) ([-+*]) (-?\d+)\?")
WRONG_RE = re.compile(r"## Incorrect response\n(.*?)\n\n## Correct response", re.S)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per arm (after 1 warm-up step each)")
    p.add_argument("--hidden", type=int, default=256, help="tiny Qwen3 hidden size")
    p.add_argument("--layers", type=int, default=4, help="tiny Qwen3 layers")
    p.add_argument("--questions", type=int, default=4, help="B, questions per step")
    p.add_argument("--samples", type=int, default=8, help="K, samples per question")
    p.add_argument("--right", type=int, default=3, help="correct samples per candidate question")
    p.add_argument("--candidate-frac", type=float, default=1.0,
                   help="fraction of questions eligible for DCS (the rest: all right, all wrong or 1 right)")
    p.add_argument("--min-len", type=int, default=60, help="shortest response, tokens")
    p.add_argument("--max-len", type=int, default=200, help="longest response, tokens")
    p.add_argument("--parse-rate", type=float, default=0.85, help="P(construction parses)")
    p.add_argument("--verify-rate", type=float, default=0.7, help="P(parsed construction is right)")
    p.add_argument("--template", choices=["scaled", "builtin"], default="scaled",
                   help="construction prompt: the built-in 'micro' template with its instructions cut to "
                        "--template-ratio x the mean response length (paper proportions, see above), or "
                        "the built-in one in full (~2,000 tokens here, 15x a response)")
    p.add_argument("--template-ratio", type=float, default=0.4,
                   help="instruction tokens / mean response tokens for --template scaled")
    p.add_argument("--decode-model", choices=["copy", "engine"], default="copy",
                   help="what the scripted rollout runs token by token: an un-hooked copy of the policy "
                        "(as TapoRollout decodes, gather=once) or the ZeRO-3 engine's module (a parameter "
                        "fetch per layer per token)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=3)
    return p.parse_args()


# ---------------------------------------------------------------------------- the scripted policy

FILLER = [
    "We rewrite the expression so that each part is easy to evaluate.",
    "Keep track of the sign of every term.",
    "Group the terms and simplify.",
    "Check the intermediate value once more.",
    "This gives the partial result.",
    "Carry the value to the next line.",
    "Nothing else changes in the expression.",
    "So far the computation is consistent.",
]
REFLECTION = ["the sign is off", "wrong value carried", "wrong term used"]


def gold_of(prompt: str) -> int:
    a, op, b = QUESTION_RE.search(prompt).groups()
    a, b = int(a), int(b)
    return {"+": a + b, "-": a - b, "*": a * b}[op]


class Policy:
    """(prompt text, k) -> response text, deterministic in its arguments (``ScriptedRollout``'s script)."""

    def __init__(self, tok, args):
        self.tok, self.a = tok, args
        self.rollout_calls = self.construct_calls = 0

    def ntok(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def n_right(self, prompt: str) -> int:
        rng = random.Random(f"difficulty|{self.a.seed}|{prompt}")
        if rng.random() < self.a.candidate_frac:
            return self.a.right
        return rng.choice([0, 1, self.a.samples])  # ineligible under n_pos=2, n_neg=4

    def steps(self, rng: random.Random, a: str, op: str, b: str, length: int, start: int = 1) -> list[str]:
        """Step lines of ``length`` tokens in all (newlines included), the last one cut to fit."""
        lines, j, total = [], start, 0
        if start == 1:
            lines.append(f"Step 1: We need to compute {a} {op} {b}.")
            total, j = self.ntok(lines[0]) + 1, 2
        while total < length:
            line = f"Step {j}: " + rng.choice(FILLER)
            lines.append(line)
            total += self.ntok(line) + 1
            j += 1
        over = total - length
        if over > 0 and (len(lines) > 1 or start > 1):
            last = lines[-1]
            keep = self.ntok(last) - over
            if keep < 12 and len(lines) > 1:  # too short to read as a step: drop it
                lines.pop()
            elif keep < 12:
                lines[-1] = last[:14].rstrip() + "."
            else:  # character-level tokenizer: a character is a token past the "Step " phrase
                cut = last[:len(last) - over]
                lines[-1] = (cut.rsplit(" ", 1)[0] if " " in cut[8:] else cut).rstrip(" ,") + "."
        return lines

    def __call__(self, prompt: str, k: int) -> str:
        if "## Incorrect response" in prompt:
            self.construct_calls += 1
            return self.construction(prompt)
        self.rollout_calls += 1
        rng = random.Random(f"response|{self.a.seed}|{prompt}|{k}")
        a, op, b = QUESTION_RE.search(prompt).groups()
        gold = gold_of(prompt)
        answer = gold if k < self.n_right(prompt) else gold + 1
        final = f"Final Answer: \\boxed{{{answer}}}"
        length = rng.randint(self.a.min_len, self.a.max_len) - self.ntok(final) - 1
        return "\n".join(self.steps(rng, a, op, b, length) + [final])

    def construction(self, prompt: str) -> str:
        """Analysis, then the wrong response's steps up to its first mistake (verbatim), a reflection
        and a correction; the reconstruction aims at 0.8-1.2x the wrong response's length (coarse steps
        and the reflection make it ~1.2x on average at these lengths)."""
        rng = random.Random(f"construction|{self.a.seed}|{prompt}")
        wrong_text = WRONG_RE.search(prompt).group(1).strip()
        wrong = wrong_text.split("\n")
        body = [s for s in wrong if not s.startswith("Final Answer")] or wrong
        # The first critical mistake: the step where a uniform 30-70 % of the body's tokens is reached
        # (never step 1, which restates the question), so the kept prefix is about half the response.
        cut, total, j = rng.uniform(0.3, 0.7) * sum(self.ntok(x) + 1 for x in body), 0, len(body)
        for i, line in enumerate(body, 1):
            total += self.ntok(line) + 1
            if total >= cut and i >= min(2, len(body)):
                j = i
                break
        a, op, b = QUESTION_RE.search(prompt).groups()
        analysis = f"<analysis>Step {j}: arithmetic, off by one.</analysis>"
        reflection = f"Wait, let me double-check step {j}: {rng.choice(REFLECTION)}."
        gold = gold_of(prompt)
        answer = gold if rng.random() < self.a.verify_rate else gold + 1
        final = f"Final Answer: \\boxed{{{answer}}}"
        target = round(self.ntok(wrong_text) * rng.uniform(0.8, 1.2))
        kept = body[:j]
        fix_len = max(20, target - sum(self.ntok(x) + 1 for x in kept + [reflection, final]))
        rec = "\n".join(kept + [reflection] + self.steps(rng, a, op, b, fix_len, start=j + 1) + [final])
        if rng.random() >= self.a.parse_rate:  # the format is not followed: no <reconstruction> tag
            return f"{analysis}\nHere is the corrected solution.\n{rec}"
        return f"{analysis}\n<reconstruction>\n{rec}\n</reconstruction>"


def scaled_template(tok, n_tokens: int) -> str:
    """The built-in 'micro' template with its instructions cut (at a word) to ``n_tokens`` tokens."""
    from tapo_ds.trajectory import DEFAULT_CONSTRUCTION_TEMPLATE

    head, sections = DEFAULT_CONSTRUCTION_TEMPLATE.split("## Problem", 1)
    words, out = head.split(" "), []
    for w in words:
        if len(tok(" ".join(out + [w]), add_special_tokens=False)["input_ids"]) > n_tokens:
            break
        out.append(w)
    return " ".join(out).rstrip() + "\n\n## Problem" + sections


# ---------------------------------------------------------------------------- the bench

def main():
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from tapo_ds.config import load_config
    from tapo_ds.data import EpochSampler, load_examples, prepare
    from tapo_ds.engine import init_distributed
    from tapo_ds.monitor import Monitor
    from tapo_ds.reward import GradingPool
    from tapo_ds.scripted import ScriptedRollout
    from tapo_ds.stages import make_rl_trainer, setup_engine

    init_distributed()
    tmp = Path(tempfile.mkdtemp(prefix="tapo_overhead_"))
    max_resp = args.max_len + 8
    base = [f"rollout.questions_per_step={args.questions}", f"rollout.samples_per_question={args.samples}",
            f"rollout.max_new_tokens={max_resp}", f"tapo.max_new_tokens={2 * max_resp + 200}",
            f"algorithm.micro_batch_size={args.micro_batch}", "optimizer.lr=1.0e-6", "optimizer.warmup_steps=0",
            "total_steps=1000", "data.limit=0", f"seed={args.seed}", f"output_dir={tmp}",
            "logging.text_every=0", "tapo.examples_every=0", "evaluation.every=0",
            f"torch_threads={args.threads}"]
    cfgs = {name: load_config(ROOT / "configs" / "tiny.yaml", base + [f"algorithm.name={name}"])
            for name in ("grpo", "tapo")}
    h = args.hidden
    heads = max(1, h // 64)
    tiny = dict(hidden_size=h, intermediate_size=3 * h, num_hidden_layers=args.layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=h // heads)
    for cfg in cfgs.values():
        cfg.model.tiny_overrides = dict(tiny)
    cfg = cfgs["tapo"]
    from tapo_ds.modeling import build_tiny_model_and_tokenizer, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    mean_len = (args.min_len + args.max_len) / 2
    if args.template == "scaled":
        path = tmp / "construction_template.txt"
        path.write_text(scaled_template(tok, round(args.template_ratio * mean_len)), encoding="utf-8")
        cfg.tapo.template = str(path)
    from tapo_ds.trajectory import load_template
    template = load_template(cfg.tapo.template or cfg.tapo.construction)
    template_tokens = len(tok(template.split("## Problem")[0], add_special_tokens=False)["input_ids"])

    torch.manual_seed(args.seed)
    # One engine for both arms: same weights, same allocator, same ZeRO-3 hooks. The scripted
    # responses do not depend on the weights, so each arm's updates cannot change the other's work.
    engine, info, tok, _ = setup_engine(cfg, 1, cfg.algorithm.micro_batch_size)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    examples = load_examples(cfg.data.train_files, "problem", "answer", limit=cfg.data.limit)
    train, _ = prepare(examples, tok, cfg.data.prompt_template, cfg.model.chat_template_kwargs,
                       cfg.data.max_prompt_tokens)
    policy = Policy(tok, args)
    if args.decode_model == "copy":
        # What TapoRollout decodes with (gather=once): a plain module, no ZeRO-3 hooks. Its weights
        # do not matter (the tokens are scripted), only its cost does.
        decoder, _ = build_tiny_model_and_tokenizer(seed=args.seed, **tiny)
        decoder.eval()
    else:
        decoder = engine

    print(f"model: tiny Qwen3 random init, {n_params / 1e6:.2f}M params, hidden {h}, {args.layers} layers, "
          f"{heads} heads, vocab {len(tok)} (character-level), fp32, ZeRO-3, 1 rank, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    print(f"workload: B={args.questions} questions x K={args.samples}, responses {args.min_len}-{args.max_len} "
          f"tokens, {args.right}/{args.samples} right on {args.candidate_frac:.0%} of questions; "
          f"n_pos={cfg.tapo.n_pos} n_neg={cfg.tapo.n_neg} m_max={cfg.tapo.m_max}, parse rate "
          f"{args.parse_rate:.2f}, verify rate {args.verify_rate:.2f}, construction template "
          f"'{cfg.tapo.construction}' {args.template} ({template_tokens} instruction tokens, "
          f"{template_tokens / mean_len:.1f}x the mean response target), decode model {args.decode_model}, "
          f"micro-batch {args.micro_batch}", flush=True)

    work: dict[str, dict] = {}
    gen_calls: dict[str, list] = {}  # per arm: one record per generate call (rollout, construction)

    def instrument(name, trainer):
        """Record what each step trains on (sequences, response tokens, all tokens)."""
        inner = trainer.update_phase

        def update_phase(samples, step):
            work[name] = dict(seqs=len(samples), resp=sum(len(s.response_ids) for s in samples),
                              tokens=sum(len(s.prompt_ids) + len(s.response_ids) for s in samples))
            return inner(samples, step)
        trainer.update_phase = update_phase

    results: dict[str, list[dict]] = {"grpo": [], "tapo": []}
    with GradingPool(num_workers=cfg.reward.num_workers, timeout=cfg.reward.timeout) as grader:
        trainers = {}
        for name, c in cfgs.items():
            rollout = ScriptedRollout(tok, policy, tok.eos_token_id, tok.pad_token_id, model=decoder)
            monitor = Monitor(tmp / name, enabled=False, tensorboard=False, progress_bar=False, total_steps=1)
            trainers[name] = make_rl_trainer(c, engine=engine, info=info, tokenizer=tok, rollout=rollout,
                                             grader=grader, monitor=monitor, train=train,
                                             sampler=EpochSampler(len(train), c.seed, c.data.shuffle))
            instrument(name, trainers[name])
            calls = gen_calls[name] = []
            inner_generate = rollout.generate

            def generate(request, sampling, _inner=inner_generate, _calls=calls):
                res = _inner(request, sampling)
                lengths = res.response_lengths.float()
                prompt = float(request.prompt_attention_mask.sum(1).float().mean())
                _calls.append(dict(rows=len(lengths), prompt=prompt, mean=float(lengths.mean()),
                                   max=float(lengths.max()), wall=res.stats["wall_s"]))
                return res
            rollout.generate = generate

        def run(name, step, timed):
            gen_calls[name].clear()
            m = trainers[name].step(step)
            for label, c in zip(("gen", "cgen"), gen_calls[name]):
                work[name].update({f"{label}_{k}": v for k, v in c.items()})
            rec = {p: m.get(f"timing/{p}", 0.0) for p in PHASES}
            rec.update(work[name])
            for key in ("tapo/pairs", "tapo/parse_success", "tapo/construction_acc", "tapo/constructed_samples",
                        "tapo/constructed_tokens", "tapo/selected_frac", "rollout/response_len_mean",
                        "rollout/acc"):
                if key in m:
                    rec[key] = m[key]
            extra = (f"  pairs {rec.get('tapo/pairs', 0):3.0f}  "
                     f"constructed {rec.get('tapo/constructed_samples', 0):3.0f}" if name == "tapo" else "")
            print(f"  {'warm-up' if not timed else f'round {step - 1}'} {name}: step {rec['step']:6.2f}s  "
                  + "  ".join(f"{p} {rec[p]:.2f}" for p in PHASES[:-1])
                  + f"  seqs {rec['seqs']}  tokens {rec['tokens']}" + extra, flush=True)
            if timed:
                results[name].append(rec)

        # Warm-up: first-call paths, allocator, grading workers; same questions (step 0) in both arms.
        run("grpo", 0, timed=False)
        run("tapo", 0, timed=False)
        for r in range(args.steps):
            order = ["grpo", "tapo"] if r % 2 == 0 else ["tapo", "grpo"]
            for name in order:
                run(name, r + 1, timed=True)

    shutil.rmtree(tmp, ignore_errors=True)
    # A key missing from some steps (no construction call when nothing was selected): median of the others.
    med = {n: {k: statistics.median(x[k] for x in v if k in x) for k in set().union(*v)}
           for n, v in results.items()}
    print(f"\nmedians over {args.steps} timed steps per arm (seconds):")
    print("  arm   " + "".join(f"{p:>11s}" for p in PHASES) + "   seqs  resp_tok  all_tok")
    for n in ("grpo", "tapo"):
        print(f"  {n:5s} " + "".join(f"{med[n][p]:11.2f}" for p in PHASES)
              + f"  {med[n]['seqs']:5.0f}  {med[n]['resp']:8.0f}  {med[n]['tokens']:7.0f}")
    t = med["tapo"]
    print(f"tapo construction per step (median): pairs {t.get('tapo/pairs', 0):.0f}, parse success "
          f"{t.get('tapo/parse_success', 0):.2f}, construction acc {t.get('tapo/construction_acc', 0):.2f}, "
          f"constructed samples {t.get('tapo/constructed_samples', 0):.0f} "
          f"({t.get('tapo/constructed_tokens', 0):.0f} tokens), selected frac {t.get('tapo/selected_frac', 0):.2f}")
    for label, what, n in (("gen", "rollout generation", "grpo"), ("gen", "rollout generation", "tapo"),
                           ("cgen", "construction generation", "tapo")):
        x = med[n]
        if label + "_rows" not in x:
            print(f"{what} ({n}): none (no pair was selected)")
            continue
        print(f"{what} ({n}, medians): {x[label + '_rows']:.0f} rows, prompt {x[label + '_prompt']:.0f} tokens, "
              f"output mean {x[label + '_mean']:.0f} / max {x[label + '_max']:.0f} tokens (decoded to the max: "
              f"no row dropping in the scripted rollout), {x[label + '_wall']:.2f}s")
    g = med["grpo"]
    print(f"training work ratio (tapo / grpo): sequences {t['seqs'] / g['seqs']:.2f}, response tokens "
          f"{t['resp'] / g['resp']:.2f}, prompt+response tokens {t['tokens'] / g['tokens']:.2f}")
    print(f"phase ratios (tapo / grpo): rollout {t['rollout'] / g['rollout']:.2f}, "
          f"update {t['update'] / g['update']:.2f} (per prompt+response token "
          f"{(t['update'] / t['tokens']) / (g['update'] / g['tokens']):.2f}); construct adds {t['construct']:.2f}s "
          f"({t['construct'] / g['step']:.0%} of a grpo step)")
    print(f"ratio without the construct phase (tapo step - construct) / grpo step: "
          f"{(t['step'] - t['construct']) / g['step']:.2f}")
    print(f"bench wall time {time.perf_counter() - T_START:.0f}s (start-up, 2 warm-up and "
          f"{2 * args.steps} timed steps)")
    print(f"ratio (tapo / grpo median step time): {t['step'] / g['step']:.2f}", flush=True)


if __name__ == "__main__":
    main()
