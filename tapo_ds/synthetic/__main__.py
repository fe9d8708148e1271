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
from pathlib import Path

from .coldstart import DEFAULT_MIX, build_synthetic_mix
from .constructor import ANALYSIS_STYLES, MODES
from .errors import ERROR_KINDS
from .task import PROMPT_TEMPLATE, SYNTHETIC_TEMPLATES, generate_dataset, read_jsonl, write_jsonl


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


def _range(values: list[int]) -> tuple[int, int]:
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def make_data(args) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    knobs = dict(steps=_range(args.steps), digits=_range(args.digits), operators=args.operators,
                 max_value=args.max_value)
    train = generate_dataset(args.train, args.seed, split="train", **knobs)
    test = generate_dataset(args.test, args.seed, split="test", **knobs)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")
    n_mix = args.train if args.coldstart is None else args.coldstart
    mix = build_synthetic_mix(
        n_mix, args.seed, proportions=args.mix, error_kinds=args.error_kinds, mode=args.mode,
        analysis=args.analysis, prompt_template=args.prompt_template,
        exclude=() if args.coldstart_overlap else [r["problem"] for r in train], **knobs)
    write_jsonl(mix.rows, out / "coldstart.jsonl")
    (out / "construction_template.txt").write_text(SYNTHETIC_TEMPLATES["micro"], encoding="utf-8")
    (out / "construction_template_full.txt").write_text(SYNTHETIC_TEMPLATES["full"], encoding="utf-8")
    meta = {"args": {k: v for k, v in vars(args).items() if k != "func"},
            "train": len(train), "test": len(test), "coldstart": mix.counts,
            "coldstart_error_kinds": mix.error_kinds, "coldstart_build": mix.build.as_dict()}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}/: train.jsonl {len(train)}, test.jsonl {len(test)}, coldstart.jsonl "
          f"{len(mix.rows)} {mix.counts}, error kinds {mix.error_kinds} "
          f"({time.perf_counter() - t0:.1f} s)")
    print(f"cold-start build: {mix.build.summary()}")
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
    p.add_argument("--mix", type=_mix, default=dict(DEFAULT_MIX), help="gold=0.5,sft=0.3,ift=0.2")
    p.add_argument("--error-kinds", nargs="+", default=list(ERROR_KINDS), choices=ERROR_KINDS)
    p.add_argument("--mode", choices=MODES, default="micro")
    p.add_argument("--analysis", choices=ANALYSIS_STYLES, default="brief")
    p.add_argument("--prompt-template", default=PROMPT_TEMPLATE)
    p.add_argument("--coldstart-overlap", action="store_true",
                   help="let the cold-start mix reuse train.jsonl problems (default: disjoint)")
    p.add_argument("--examples", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=make_data)
    s = sub.add_parser("stats", help="token lengths with the tiny tokenizer")
    s.add_argument("--data", default="data/synthetic")
    s.set_defaults(func=stats)
    args = parser.parse_args(argv)
    if getattr(args, "steps", None) is not None and len(args.steps) > 2 or \
            getattr(args, "digits", None) is not None and len(args.digits) > 2:
        parser.error("--steps and --digits take one or two numbers")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
