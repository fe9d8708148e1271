"""Helpers for tests that start tiny training runs as separate processes and interrupt them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from conftest import subprocess_env

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")
MAIN = str(REPO / "tapo_ds" / "main.py")

# A few seconds per step on 2 cores; checkpoints every 2 steps.
SMALL = ["rollout.questions_per_step=2", "rollout.samples_per_question=4", "rollout.max_new_tokens=12",
         "algorithm.micro_batch_size=4", "checkpoint.every=2", "checkpoint.export_hf=false",
         "logging.progress_bar=false", "logging.text_every=1", "reward.num_workers=1", "data.limit=16",
         "torch_threads=1", "evaluation.every=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(out_dir: Path, name: str, sets=(), args=(), ranks: int = 0) -> list[str]:
    """``ranks=0``: plain python (one process); otherwise the deepspeed launcher with that many ranks."""
    launcher = [PY] if ranks == 0 else [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port())]
    cmd = launcher + [MAIN, "--config", str(REPO / "configs" / "tiny.yaml")]
    for s in SMALL + [f"output_dir={out_dir}", f"name={name}"] + list(sets):
        cmd.append(f"--set={s}")
    return cmd + list(args)


class Run:
    """A run in the background; its output goes to files (a pipe nobody reads could fill up)."""

    def __init__(self, cmd: list[str], log_dir: Path, tag: str, **env):
        self.out_path, self.err_path = log_dir / f"{tag}.out", log_dir / f"{tag}.err"
        self._out, self._err = self.out_path.open("w"), self.err_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1", **env),
                                     stdout=self._out, stderr=self._err, start_new_session=True)

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    @property
    def output(self) -> str:
        return self.out_path.read_text() + self.err_path.read_text()

    def workers(self, count: int, timeout: float = 120) -> list[psutil.Process]:
        """The training processes (``--local_rank=`` in their command line), by rank."""
        def find():
            procs = []
            for p in [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    rank = [a for a in p.cmdline() if a.startswith("--local_rank=")]
                except psutil.NoSuchProcess:
                    continue
                if rank:
                    procs.append((int(rank[0].split("=")[1]), p))
            return [p for _, p in sorted(procs, key=lambda x: x[0])] if len(procs) == count else None
        return wait_for(find, timeout, "worker processes")

    def kill_all(self) -> None:
        """Leave nothing behind whatever happened (a failed assertion included)."""
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True) + [psutil.Process(self.proc.pid)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(30)


def finished(cmd: list[str], log_dir: Path, tag: str, timeout: float = 300, **env) -> Run:
    run = Run(cmd, log_dir, tag, **env)
    try:
        code = run.wait(timeout)
    finally:
        run.kill_all()
    assert code == 0, run.output[-6000:]
    return run


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return rows


def logged_step(run_dir: Path, step: int):
    return lambda: any(r["step"] >= step for r in metrics(run_dir))


def tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    """Steps of scalar ``tag`` as TensorBoard shows them (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]
