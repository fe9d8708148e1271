"""Evaluation: AIME 2024, AIME 2025 and HMMT February 2025 as lm-eval tasks
(`eval/tasks`), their metrics (`eval.metrics`) and the paper's protocol runner
(`python -m eval.run`). See eval/README.md."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BENCHMARKS = ("aime24", "aime25", "hmmt25")
