"""Checkpoints: DeepSpeed state + client state (step, sampler, RNG), resume, HF export."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from tapo_ds.engine import gathered_state_dict
from tapo_ds.modeling import export_hf, load_state_checked

log = logging.getLogger(__name__)

_TAG_PREFIX = "step_"


class CheckpointError(ValueError):
    pass


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, rank: int) -> Path:
    tag = f"{_TAG_PREFIX}{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    if rank == 0:
        # Older checkpoints go only after the new one is complete (save_checkpoint wrote `latest`).
        tags = sorted(p for p in ckpt_dir.glob(f"{_TAG_PREFIX}*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt_dir / tag


def resolve_resume(resume: str | None, ckpt_dir: Path) -> tuple[Path, str] | None:
    """``auto`` -> the latest checkpoint in this run (None if there is none); a path -> that one."""
    if not resume:
        return None
    if resume == "auto":
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            log.info("--resume auto: no checkpoint in %s, starting fresh", ckpt_dir)
            return None
        return ckpt_dir, latest.read_text().strip()
    path = Path(resume)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if path.is_dir() and path.name.startswith(_TAG_PREFIX):
        return path.parent, path.name
    raise CheckpointError(f"--resume {resume}: not a checkpoint folder (expected a run's checkpoints/ "
                          f"folder with a `latest` file, or one of its {_TAG_PREFIX}* folders)")


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
