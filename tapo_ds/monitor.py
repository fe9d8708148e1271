"""TensorBoard and the progress bar, rank 0 only, passed to whoever logs (never global).

(Named ``monitor`` rather than ``logging`` so that running ``tapo_ds/main.py`` as a script,
which puts this folder on ``sys.path``, cannot shadow the standard library.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class Monitor:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress_bar: bool,
                 total_steps: int, initial_step: int = 0, desc: str = "train", append: bool = False):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self._jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        # A plain-text copy of every scalar: greppable, and what the tests read.
        # A resumed run continues the file; a fresh run in the same folder starts it anew.
        self._jsonl = (run_dir / "metrics.jsonl").open("a" if append else "w", encoding="utf-8")
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if self.writer is not None:
            for key, value in clean.items():
                self.writer.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.writer is not None:
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
