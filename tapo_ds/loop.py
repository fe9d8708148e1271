"""The one training loop, shared by SFT and RL: step, log, checkpoint, export, stop on a signal."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tapo_ds import checkpoint
from tapo_ds.engine import all_reduce_
from tapo_ds.preemption import StopRequest

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What a checkpoint must hold besides the weights to continue a run exactly."""
    step: int
    sampler: object  # has state_dict()/load_state_dict()
    extra: Callable[[], dict] | None = None  # more client state (e.g. rollout RNG)
    restore_extra: Callable[[dict], None] | None = None


def run_loop(*, step_fn: Callable[[int], dict], state: LoopState, total_steps: int, engine, tokenizer,
             monitor, run_dir: Path, ckpt_every: int, keep_last: int, export_hf: bool, rank: int,
             bar_fields: dict[str, str] | None = None) -> dict:
    """Run steps ``state.step + 1 .. total_steps``; returns the last step's metrics.

    On SIGTERM/SIGINT the current step finishes, every rank saves and the loop returns early (no
    HF export); the ranks agree on the stop at each step boundary, so all stop at the same step."""
    ckpt_dir = run_dir / "checkpoints"
    metrics: dict = {}
    with StopRequest() as stop:
        for step in range(state.step + 1, total_steps + 1):
            metrics = step_fn(step)
            for key, value in metrics.items():
                if key.endswith("loss") and isinstance(value, float) and not math.isfinite(value):
                    raise FloatingPointError(f"step {step}: {key} is {value}; stopping before the weights degrade")
            monitor.scalars(metrics, step)
            monitor.progress({label: metrics[k] for label, k in (bar_fields or {}).items() if k in metrics})
            state.step = step
            saved = (ckpt_every and step % ckpt_every == 0) or step == total_steps
            if saved:
                save(engine, state, ckpt_dir, keep_last, rank)
            if step < total_steps and _agreed(stop.requested, engine.device):
                where = ckpt_dir / checkpoint.tag_of(step)
                if not saved:
                    where = save(engine, state, ckpt_dir, keep_last, rank)
                monitor.message(f"stopped by {stop.name or 'a signal on another rank'} after step {step} of "
                                f"{total_steps}: checkpoint {where}; to continue, run the same command "
                                f"(same config and name) with --resume auto")
                return metrics
    if export_hf:
        out = checkpoint.export(engine, tokenizer, run_dir / "hf", rank)
        if out is not None:
            monitor.message(f"HF export: {out}")
    return metrics


def _agreed(local: bool, device) -> bool:
    """True on every rank if any rank was asked to stop (one all-reduce per step)."""
    flag = torch.tensor([1.0 if local else 0.0], dtype=torch.float32, device=device)
    return bool(all_reduce_(flag, "max").item() > 0)


def save(engine, state: LoopState, ckpt_dir: Path, keep_last: int, rank: int) -> Path:
    client = {"step": state.step, "sampler": state.sampler.state_dict(), "rng": checkpoint.rng_state()}
    if state.extra is not None:
        client["extra"] = state.extra()
    return checkpoint.save(engine, ckpt_dir, state.step, client, keep_last, rank)


def resume_target(resume_arg: str | None, run_dir: Path):
    """Where ``--resume`` points, checked before any model is loaded (a typo fails in a second)."""
    return checkpoint.resolve_resume(resume_arg, run_dir / "checkpoints")


def resume(engine, state: LoopState, where, monitor) -> None:
    """Load ``where`` (None: nothing to resume) and tell the monitor which records stay valid."""
    if where is not None:
        client = checkpoint.load(engine, where)
        state.step = int(client["step"])
        state.sampler.load_state_dict(client["sampler"])
        checkpoint.set_rng_state(client["rng"])
        if state.restore_extra is not None and "extra" in client:
            state.restore_extra(client["extra"])
        monitor.message(f"resumed from {where[0] / where[1]} at step {state.step}")
    monitor.continue_after(state.step)
