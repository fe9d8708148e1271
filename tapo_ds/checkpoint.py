"""Checkpoints: DeepSpeed state + client state (step, sampler, RNG), resume, HF export.

A checkpoint counts only once every rank has written it: rank 0 then adds a ``complete`` marker
and points ``latest`` at it, so a write cut short (a kill, a full disk) is never resumed from.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tapo_ds.engine import gathered_state_dict
from tapo_ds.modeling import export_hf, load_state_checked

log = logging.getLogger(__name__)

_TAG_PREFIX = "step_"
COMPLETE = "complete"
# Test hook: seconds to sleep between the ranks' writes and the completion marker, so that a test
# can kill a run in the middle of a checkpoint write.
SLOW_SAVE_ENV = "TAPO_DS_TEST_SLOW_SAVE_S"


class CheckpointError(ValueError):
    pass


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def tag_of(step: int) -> str:
    return f"{_TAG_PREFIX}{step:08d}"


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, rank: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = tag_of(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():
        _forget(ckpt_dir, tag)  # a write of this step that never completed (or an abandoned timeline)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    delay = float(os.environ.get(SLOW_SAVE_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    _barrier()  # every rank's shard is on disk before the marker says so
    if rank == 0:
        (tag_dir / COMPLETE).write_text(f"{step}\n")
        _write_atomic(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, step, keep_last)
    _barrier()
    return tag_dir


def _forget(ckpt_dir: Path, tag: str) -> None:
    latest = ckpt_dir / "latest"
    if latest.is_file() and latest.read_text().strip() == tag:
        latest.unlink()
    shutil.rmtree(ckpt_dir / tag)


def _prune(ckpt_dir: Path, step: int, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints up to ``step``; drop the rest, including
    incomplete ones and any newer ones left by a run that was resumed from an earlier step."""
    keep = [t for t in complete_tags(ckpt_dir) if _step_of(t) <= step][-keep_last:]
    for path in _tag_dirs(ckpt_dir):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _tag_dirs(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob(f"{_TAG_PREFIX}*") if p.is_dir() and _step_of(p.name) is not None)


def _step_of(tag: str) -> int | None:
    digits = tag[len(_TAG_PREFIX):]
    return int(digits) if tag.startswith(_TAG_PREFIX) and digits.isdigit() else None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose write completed, oldest first. A folder written before completion markers existed
    (none has one) counts the checkpoint its ``latest`` file names, which was written last."""
    dirs = _tag_dirs(ckpt_dir)
    marked = [p.name for p in dirs if (p / COMPLETE).is_file()]
    if marked or not (ckpt_dir / "latest").is_file():
        return marked
    legacy = (ckpt_dir / "latest").read_text().strip()
    return [legacy] if _step_of(legacy) is not None and (ckpt_dir / legacy).is_dir() else []


def resolve_resume(resume: str | None, ckpt_dir: Path) -> tuple[Path, str] | None:
    """``auto`` -> the newest complete checkpoint of this run (None if there is none); a path ->
    that checkpoint folder, or the newest complete one in that checkpoints folder."""
    if not resume:
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        if not tags:
            incomplete = [p.name for p in _tag_dirs(ckpt_dir)]
            log.info("--resume auto: no complete checkpoint in %s%s, starting fresh", ckpt_dir,
                     f" (incomplete: {', '.join(incomplete)})" if incomplete else "")
            return None
        return ckpt_dir, tags[-1]
    path = Path(resume)
    if path.is_dir() and _step_of(path.name) is not None:
        if path.name not in complete_tags(path.parent):
            raise CheckpointError(f"--resume {resume}: incomplete checkpoint (its write was interrupted); "
                                  f"resume from an earlier one or with --resume auto")
        return path.parent, path.name
    tags = complete_tags(path)
    if tags:
        return path, tags[-1]
    raise CheckpointError(f"--resume {resume}: not a checkpoint folder (expected a run's checkpoints/ "
                          f"folder holding a complete {_TAG_PREFIX}* checkpoint, or one of those folders)")


def load(engine, where: tuple[Path, str]) -> dict:
    ckpt_dir, tag = where
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"--resume: {ckpt_dir / tag} does not exist")
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None or not client_state:
        raise CheckpointError(f"--resume: DeepSpeed could not load {ckpt_dir / tag}")
    for key in ("step", "sampler", "rng"):
        if key not in client_state:
            raise CheckpointError(f"--resume: {ckpt_dir / tag} lacks client state {key!r}")
    return client_state


def export(engine, tokenizer, out_dir: Path, rank: int) -> Path | None:
    """HF-format folder (``save_pretrained`` + tokenizer); every rank joins the ZeRO-3 gather."""
    state = gathered_state_dict(engine)
    if rank != 0:
        return None
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        # The engine's own module holds partitioned (empty) tensors: save from a fresh copy.
        from transformers import AutoModelForCausalLM

        module = load_state_checked(AutoModelForCausalLM.from_config(engine.module.config), state,
                                    f"export to {out_dir}")
        state = None
    return export_hf(module, tokenizer, out_dir, state_dict=state)
