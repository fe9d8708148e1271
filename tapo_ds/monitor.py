"""TensorBoard and the progress bar, rank 0 only, passed to whoever logs (never global).

(Named ``monitor`` rather than ``logging`` so that running ``tapo_ds/main.py`` as a script,
which puts this folder on ``sys.path``, cannot shadow the standard library.)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class Monitor:
    """``append``: a resumed run. Its files open on first use, after ``continue_after`` has said
    from which step on the earlier run's records are void."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress_bar: bool,
                 total_steps: int, initial_step: int = 0, desc: str = "train", append: bool = False):
        self.enabled = enabled
        self.run_dir = run_dir
        self.writer = None
        self.bar = None
        self._jsonl = None
        self._tensorboard = tensorboard
        self._append = append
        self._purge_from: int | None = None  # first step a resumed run logs anew
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def continue_after(self, step: int) -> None:
        """A resumed run goes on from checkpoint ``step``: what a killed run logged after it goes, so
        each step is recorded once. From step 0 nothing is kept (step 0 is the evaluation before
        training, which runs again)."""
        if not (self.enabled and self._append):
            return
        if self._jsonl is not None or self.writer is not None:
            raise RuntimeError("Monitor.continue_after: called after logging started")
        self._purge_from = step + 1 if step > 0 else 0

    def _open(self) -> None:
        if self._jsonl is not None:
            return
        path = self.run_dir / "metrics.jsonl"
        if self._append and self._purge_from is not None:
            truncate_metrics(path, self._purge_from)
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step makes TensorBoard drop the earlier events from that step on.
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                        purge_step=self._purge_from if self._append else None)
        # A plain-text copy of every scalar: greppable, and what the tests read.
        self._jsonl = path.open("a" if self._append else "w", encoding="utf-8")

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self._open()
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if self.writer is not None:
            for key, value in clean.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()  # what a kill leaves behind is what the checkpoint logic expects
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if not self.enabled:
            return
        self._open()
        if self.writer is not None:
            # TensorBoard renders text as markdown: fence it so LaTeX and tags show verbatim.
            self.writer.add_text(tag, "```\n" + text.replace("```", "'''") + "\n```", step)

    def progress(self, fields: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3g}" if isinstance(v, float) else v for k, v in fields.items()},
                                 refresh=False)

    def message(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def truncate_metrics(path: Path, first_void_step: int) -> None:
    """Drop the rows of ``path`` with ``step >= first_void_step`` (and a torn last line), in place."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the half-written line of a killed run
        if row.get("step", 0) < first_void_step:
            keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)
