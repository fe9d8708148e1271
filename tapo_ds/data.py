"""Training data: loading and validating rows, rendering prompts, the resumable sampler."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


class DataError(ValueError):
    """A bad dataset row; the message names the file and line (or index)."""


@dataclass(frozen=True)
class Example:
    problem: str
    answer: str
    source: str  # "file:line" or "dataset[index]", for error messages and logs
    solution: str | None = None  # a reference solution (data.solution_field), for OPSD's teacher


def load_examples(sources: Sequence[str], problem_field: str, answer_field: str,
                  split: str = "train", limit: int = 0, solution_field: str = "") -> list[Example]:
    """Read jsonl/parquet files or hub datasets; every row must have a problem and an answer."""
    out: list[Example] = []
    for src in sources:
        path = Path(src)
        if path.suffix == ".jsonl" or path.suffix == ".json":
            rows = jsonl_rows(path)
        elif path.suffix == ".parquet":
            rows = _parquet_rows(path)
        elif path.exists():
            raise DataError(f"{src}: unsupported file type (expected .jsonl or .parquet)")
        else:
            rows = _hub_rows(src, split)
        for where, row in rows:
            out.append(_to_example(row, where, problem_field, answer_field, solution_field))
            if limit and len(out) >= limit:
                return out
    if not out:
        raise DataError(f"{', '.join(map(str, sources))}: no rows")
    return out


def jsonl_rows(path: Path):
    """(``file:line``, object) for every non-blank line; bad JSON is an error naming the line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected an object, got {type(row).__name__}")
            yield f"{path}:{lineno}", row


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """Write one JSON object per line (parents created); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    for index, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}[{index}]", row


def _hub_rows(name: str, split: str):
    import datasets

    ds = datasets.load_dataset(name, split=split)
    for index, row in enumerate(ds):
        yield f"{name}[{split}][{index}]", row


def _to_example(row, where: str, problem_field: str, answer_field: str, solution_field: str = "") -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    values = []
    for fname in (problem_field, answer_field):
        value = row.get(fname)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # AIME answers often arrive as integers
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: missing or empty field {fname!r} (row keys: {sorted(row)})")
        values.append(value)
    solution = None
    if solution_field:
        solution = row.get(solution_field)
        if solution is not None and not isinstance(solution, str):
            raise DataError(f"{where}: field {solution_field!r} must be a string, got {type(solution).__name__}")
        solution = solution or None  # an empty reference: fall back to the group's right answers
    return Example(problem=values[0], answer=values[1].strip(), source=where, solution=solution)


def render_prompt(tokenizer, problem: str, template: str, chat_template_kwargs: dict) -> str:
    """The user turn with the chat template applied, ready for generation."""
    content = template.replace("{problem}", problem)
    return render_chat(tokenizer, content, chat_template_kwargs)


def render_chat(tokenizer, content: str, chat_template_kwargs: dict) -> str:
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **chat_template_kwargs)


def encode(tokenizer, text: str) -> list[int]:
    # The chat template already wrote every special token; adding BOS again would shift prompts.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class PromptedExample:
    example: Example
    prompt_ids: list[int]


def prepare(examples: Sequence[Example], tokenizer, template: str, chat_template_kwargs: dict,
            max_prompt_tokens: int) -> tuple[list[PromptedExample], int]:
    """Tokenise prompts once; drop (and count) those over the prompt budget."""
    kept, too_long = [], 0
    for ex in examples:
        ids = encode(tokenizer, render_prompt(tokenizer, ex.problem, template, chat_template_kwargs))
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        kept.append(PromptedExample(ex, ids))
    if not kept:
        raise DataError(f"every prompt exceeds data.max_prompt_tokens = {max_prompt_tokens}")
    return kept, too_long


class EpochSampler:
    """Seeded shuffled epochs; the state (epoch, position) goes into checkpoints.

    Every rank runs the same sampler and takes its own slice of each global batch, so the
    data order depends only on the seed, never on the number of ranks or on a resume.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size <= 0:
            raise ValueError("EpochSampler needs at least one example")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_indices(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position >= self.size:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), self.size - self.position)
            out.extend(self._order[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for {state['size']} examples with seed {state['seed']}, "
                f"but this run has {self.size} with seed {self.seed}: the data changed since the checkpoint")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def shard(items: Sequence, rank: int, world: int) -> list:
    """This rank's contiguous slice of a global batch (the batch size is divisible by world)."""
    per = len(items) // world
    return list(items[rank * per:(rank + 1) * per])
