"""``python -m tapo_ds.report RUN_DIR``: the held-out evaluation before and after training, as a table.

Reads ``metrics.jsonl`` (every ``eval/<set>/<metric>`` the run logged): the first evaluation
(step 0 with ``evaluation.at_start``) is "before", the last is "after".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def eval_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run folder?)")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno}: not JSON") from None
        evals = {k: v for k, v in row.items() if k.startswith("eval/")}
        if evals:
            rows.append({"step": row["step"], **evals})
    return rows


def before_after_table(run_dir: Path) -> str:
    rows = eval_rows(run_dir)
    if not rows:
        return f"{run_dir}: no evaluation logged (set evaluation.files and evaluation.every/at_start)"
    first, last = rows[0], rows[-1]
    keys = sorted(k for k in last if k != "step")
    lines = [f"| metric | step {first['step']} (before) | step {last['step']} (after) | change |",
             "|---|---|---|---|"]
    for k in keys:
        a, b = first.get(k), last[k]
        before = f"{100 * a:.1f}%" if a is not None else "-"
        delta = f"{100 * (b - a):+.1f}" if a is not None else "-"
        lines.append(f"| {k.removeprefix('eval/')} | {before} | {100 * b:.1f}% | {delta} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tapo_ds.report", description=__doc__)
    p.add_argument("run_dirs", nargs="+", type=Path)
    args = p.parse_args(argv)
    for run_dir in args.run_dirs:
        print(f"\n{run_dir}\n")
        print(before_after_table(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
