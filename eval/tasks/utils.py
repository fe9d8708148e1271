"""Functions the task YAMLs in this folder call through `!function utils.<name>`.

lm-eval loads this file by path (not as `eval.tasks.utils`), from whatever working
directory `lm_eval` runs in; `tapo_ds.reward` (the trainer's grader, shared so that evaluation
and reward agree) and `eval.metrics` come from the installed package (`pip install -e .`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from eval.metrics import summarize
from tapo_ds.reward import last_boxed, math_equal

DATA_DIR_ENV = "TAPO_EVAL_DATA_DIR"
LOCAL_FIELDS = ("id", "problem", "answer")


def load_benchmark(
    benchmark: str,
    hub_path: str,
    hub_split: str,
    hub_problem_field: str,
    hub_answer_field: str,
    hub_id_field: str | None = None,
    **_metadata,
):
    """`custom_dataset` of the tasks: a DatasetDict with one split, "test", of rows
    {id, problem, answer} (all strings).

    With $TAPO_EVAL_DATA_DIR set, reads `$TAPO_EVAL_DATA_DIR/<benchmark>.jsonl` (fields
    id, problem, answer) and never touches the network; otherwise loads the hub dataset
    named in the task YAML. lm-eval passes the task metadata (model args, version, ...)
    as extra keyword arguments; they are ignored.
    """
    import datasets

    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        rows = _read_jsonl(Path(data_dir).expanduser().resolve() / f"{benchmark}.jsonl")
    else:
        hub = datasets.load_dataset(hub_path, split=hub_split)
        rows = [
            {
                "id": str(row[hub_id_field]) if hub_id_field else f"{benchmark}-{i}",
                "problem": str(row[hub_problem_field]),
                "answer": str(row[hub_answer_field]),
            }
            for i, row in enumerate(hub)
        ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file ({DATA_DIR_ENV} is set, so the tasks read "
            f"${DATA_DIR_ENV}/<task>.jsonl instead of the hub)"
        )
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
            missing = [f for f in LOCAL_FIELDS if not isinstance(row, dict) or f not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
            rows.append({f: str(row[f]) for f in LOCAL_FIELDS})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def keep_all_samples(resps, docs):
    """Filter that keeps every one of the `repeats` samples of a problem (lm-eval's
    default filter keeps only the first)."""
    return [list(r) for r in resps]


def grade(response: str, gold: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) for one sample.

    The answer is the content of the last complete \\boxed{} (None: no box, as the
    trainer's reward counts it). A sample without a boxed answer, or with an empty box,
    is wrong; otherwise the verdict is exactly the trainer's `math_equal(response, gold)`.
    (Unlike the trainer's reward, a short unboxed response is not graded as a bare
    answer: the prompt asks for a box.)
    """
    answer = last_boxed(response)
    return answer, bool(answer and answer.strip()) and math_equal(response, gold)


def process_results(doc: dict, results: list) -> dict[str, float]:
    """Per-problem metrics from all its samples (see `eval.metrics.summarize`)."""
    (responses,) = results  # one request per problem; the filter kept all repeats
    if isinstance(responses, str):
        responses = [responses]
    graded = [grade(r, doc["answer"]) for r in responses]
    answers = [a for a, _ in graded]
    correct = [ok for _, ok in graded]
    return summarize(answers, correct, math_equal)
