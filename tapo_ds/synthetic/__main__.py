"""CLI of the synthetic task.

    python -m tapo_ds.synthetic make-data --out data/synthetic --train 2000 --test 200 --seed 0 \\
        [--steps 2 4] [--digits 1] [--operators +-*] [--coldstart 2000] [--mix gold=0.5,sft=0.3,ift=0.2]
    python -m tapo_ds.synthetic stats --data data/synthetic     # token lengths, tiny tokenizer

make-data writes train.jsonl and test.jsonl (id, problem, answer, solution; disjoint),
coldstart.jsonl (the cold-start mix: prompt, response, kind), the two synthetic
construction templates (construction_template.txt, construction_template_full.txt) and
meta.json (the arguments and counts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..data import read_jsonl, write_jsonl
from .constructor import ANALYSIS_STYLES, MODES
from .errors import ERROR_KINDS
from .mix import DEFAULT_MIX, build_synthetic_mix
from .task import PROMPT_TEMPLATE, SYNTHETIC_TEMPLATES, generate_dataset, parse_problem


def _mix(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--mix: expected kind=weight, got {part!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix: {value!r} is not a number") from None
    return out


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1], got {value}")
    return value


def _range(values: list[int]) -> tuple[int, int]:
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _problems_of(rows: list[dict]) -> list[str]:
    """The problem texts of cold-start rows (an IFT prompt names its problem too)."""
    return [parse_problem(r["prompt"]).text for r in rows]


def make_data(args) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    knobs = dict(steps=_range(args.steps), digits=_range(args.digits), operators=args.operators,
                 max_value=args.max_value)
    mix_knobs = dict(knobs)
    if args.coldstart_steps is not None:
        mix_knobs["steps"] = _range(args.coldstart_steps)
    if args.coldstart_max_value is not None:
        mix_knobs["max_value"] = args.coldstart_max_value
    n_mix = args.train if args.coldstart is None else args.coldstart
    mix_args = dict(proportions=args.mix, error_kinds=args.error_kinds, mode=args.mode,
                    analysis=args.analysis, prompt_template=args.prompt_template,
                    slip_rate=args.slip_rate, **mix_knobs)
    test = generate_dataset(args.test, args.seed, split="test", **knobs)
    phase2 = None
    if args.phase2:
        # A second cold-start phase: its own mix (another seed), drawn before train.jsonl.
        phase2 = build_synthetic_mix(args.phase2, args.seed + 1, **dict(
            mix_args, proportions=args.phase2_mix, check_rate=args.phase2_check_rate))
    if args.coldstart_first:
        # The mix does not depend on the RL split's knobs; train.jsonl keeps off its problems.
        mix = build_synthetic_mix(n_mix, args.seed, **mix_args)
        exclude = () if args.coldstart_overlap else _problems_of(mix.rows + (phase2.rows if phase2 else []))
        train = generate_dataset(args.train, args.seed, split="train", exclude=exclude, **knobs)
    else:
        if phase2 is not None:
            raise ValueError("--phase2 needs --coldstart-first (train.jsonl keeps off both mixes)")
        train = generate_dataset(args.train, args.seed, split="train", **knobs)
        mix = build_synthetic_mix(
            n_mix, args.seed, exclude=() if args.coldstart_overlap else [r["problem"] for r in train], **mix_args)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")
    write_jsonl(mix.rows, out / "coldstart.jsonl")
    if phase2 is not None:
        write_jsonl(phase2.rows, out / "coldstart_phase2.jsonl")
    (out / "construction_template.txt").write_text(SYNTHETIC_TEMPLATES["micro"], encoding="utf-8")
    (out / "construction_template_full.txt").write_text(SYNTHETIC_TEMPLATES["full"], encoding="utf-8")
    meta = {"args": {k: v for k, v in vars(args).items() if k != "func"},
            "train": len(train), "test": len(test), "coldstart": mix.counts,
            "coldstart_error_kinds": mix.error_kinds, "coldstart_build": mix.build.as_dict(),
            "coldstart_slipped": mix.slipped}
    if phase2 is not None:
        meta.update(coldstart_phase2=phase2.counts, coldstart_phase2_error_kinds=phase2.error_kinds,
                    coldstart_phase2_build=phase2.build.as_dict(), coldstart_phase2_slipped=phase2.slipped)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}/: train.jsonl {len(train)}, test.jsonl {len(test)}, coldstart.jsonl "
          f"{len(mix.rows)} {mix.counts}, error kinds {mix.error_kinds} "
          f"({time.perf_counter() - t0:.1f} s)")
    print(f"cold-start build: {mix.build.summary()}" + (f", slipped IFT rows {mix.slipped}" if mix.slipped else ""))
    if phase2 is not None:
        print(f"coldstart_phase2.jsonl {len(phase2.rows)} {phase2.counts}: {phase2.build.summary()}"
              + (f", slipped IFT rows {phase2.slipped}" if phase2.slipped else ""))
    if args.examples:
        print("--- a training problem\n" + train[0]["problem"] + "\n" + train[0]["solution"])
        for kind in ("sft", "ift"):
            row = next((r for r in mix.rows if r["kind"] == kind), None)
            if row is not None:
                print(f"--- a cold-start {kind} row\n[prompt]\n{row['prompt']}\n[response]\n{row['response']}")
    return 0


def _lengths(tokenizer, texts: list[str]) -> str:
    if not texts:
        return "n 0"
    n = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    chars = [len(t) for t in texts]
    return (f"n {len(n):5d}  tokens mean {statistics.fmean(n):6.1f} max {max(n):4d}  "
            f"chars mean {statistics.fmean(chars):6.1f} max {max(chars):4d}")


def stats(args) -> int:
    from ..modeling import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    data = Path(args.data)
    for name in ("train", "test"):
        path = data / f"{name}.jsonl"
        if path.is_file():
            rows = read_jsonl(path)
            print(f"{name:9s} problem   {_lengths(tok, [r['problem'] for r in rows])}")
            print(f"{name:9s} solution  {_lengths(tok, [r['solution'] for r in rows])}")
    path = data / "coldstart.jsonl"
    if path.is_file():
        rows = read_jsonl(path)
        for kind in ("gold", "sft", "ift"):
            sel = [r for r in rows if r["kind"] == kind]
            print(f"{kind:9s} prompt    {_lengths(tok, [r['prompt'] for r in sel])}")
            print(f"{kind:9s} response  {_lengths(tok, [r['response'] for r in sel])}")
    return 0


def probe(args) -> int:
    from .probe import run_probe, write_report

    rep = run_probe(args.model, args.config, questions=args.questions, seed=args.seed, constructor=args.constructor,
                    eval_samples=args.eval_samples, threads=args.threads, overrides=args.set, pairs=args.pairs)
    print(rep.table())
    print(json.dumps(asdict(rep)))
    if args.out:
        sets = "".join(f" --set {x}" for x in args.set)
        command = (f"python -m tapo_ds.synthetic probe-constructor --model {args.model} --config {args.config}{sets} "
                   f"--questions {args.questions} --seed {args.seed} --constructor {args.constructor} "
                   f"--eval-samples {args.eval_samples}{'' if args.pairs == 'own' else ' --pairs ' + args.pairs} "
                   f"--out {args.out}")
        write_report(rep, args.out, command)
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tapo_ds.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-data", help="write train/test/cold-start files")
    p.add_argument("--out", default="data/synthetic")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4], metavar="N", help="lo [hi]")
    p.add_argument("--digits", type=int, nargs="+", default=[1], metavar="D", help="lo [hi]")
    p.add_argument("--operators", default="+-*", help="a subset of +-*/ (division is exact)")
    p.add_argument("--max-value", type=int, default=None, help="bound on every intermediate value")
    p.add_argument("--coldstart", type=int, default=None, help="rows of the mix (default: --train)")
    p.add_argument("--coldstart-steps", type=int, nargs="+", default=None, metavar="N",
                   help="lo [hi] steps of the mix's problems (default: --steps)")
    p.add_argument("--coldstart-max-value", type=int, default=None,
                   help="--max-value of the mix's problems (default: --max-value)")
    p.add_argument("--coldstart-first", action="store_true",
                   help="draw the mix first and keep train.jsonl off its problems (default: the mix keeps "
                        "off train.jsonl), so that the mix does not depend on the RL split's knobs")
    p.add_argument("--mix", type=_mix, default=dict(DEFAULT_MIX), help="gold=0.5,sft=0.3,ift=0.2")
    p.add_argument("--phase2", type=int, default=0,
                   help="rows of a second cold-start mix, coldstart_phase2.jsonl (seed + 1; needs --coldstart-first)")
    p.add_argument("--phase2-mix", type=_mix, default=dict(DEFAULT_MIX), help="proportions of the second mix")
    p.add_argument("--phase2-check-rate", type=float, default=0.0,
                   help="share of the second mix's wrong and right answers that carry a harmless re-check line")
    p.add_argument("--error-kinds", nargs="+", default=list(ERROR_KINDS), choices=ERROR_KINDS)
    p.add_argument("--mode", choices=MODES, default="micro")
    p.add_argument("--analysis", choices=ANALYSIS_STYLES, default="brief",
                   help="the construction rows' analysis text (tapo_ds.synthetic.constructor.analysis_text)")
    p.add_argument("--slip-rate", type=_rate, default=0.0,
                   help="share of construction (IFT) rows, in each phase, whose correction slips once (wrong answer)")
    p.add_argument("--prompt-template", default=PROMPT_TEMPLATE)
    p.add_argument("--coldstart-overlap", action="store_true",
                   help="let the cold-start mix reuse train.jsonl problems (default: disjoint)")
    p.add_argument("--examples", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=make_data)
    q = sub.add_parser("probe-constructor", help="how a checkpoint constructs on its own wrong/right pairs")
    q.add_argument("--model", default="checkpoints/miniature-coldstart")
    q.add_argument("--config", default="configs/quickstart.yaml",
                   help="rollout.*, tapo.*, evaluation.* and data.* settings to probe with")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    q.add_argument("--questions", type=int, default=200, help="held-out questions (the first N)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--constructor", choices=("model", "rule"), default="model",
                   help="rule: the synthetic rule constructor stands in for the model")
    q.add_argument("--eval-samples", type=int, default=5, help="samples for pass@1 at evaluation.* (0 = skip)")
    q.add_argument("--pairs", choices=("own", "injected"), default="own",
                   help="own: the model's own wrong/right answers (the measure); injected: 2 gold and 6 rule-injected "
                        "wrong answers per question, the cold start's training distribution (a diagnostic)")
    q.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch's default)")
    q.add_argument("--out", default=None, help="markdown report (and the same name with .json)")
    q.set_defaults(func=probe)
    s = sub.add_parser("stats", help="token lengths with the tiny tokenizer")
    s.add_argument("--data", default="data/synthetic")
    s.set_defaults(func=stats)
    args = parser.parse_args(argv)
    if any(len(getattr(args, k, None) or ()) > 2 for k in ("steps", "digits", "coldstart_steps")):
        parser.error("--steps, --digits and --coldstart-steps take one or two numbers")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
