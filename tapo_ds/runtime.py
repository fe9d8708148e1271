"""What a stage runs on, built once from the config: engine, tokenizer, rollout engine, grader, monitor.

Stages ask :func:`open_runtime` for the parts they need and get them back in a :class:`Runtime`;
leaving the ``with`` block closes the grading pool and the monitor. This module and the stages are
the only readers of the whole config: what they build gets plain values.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from deepspeed.runtime.rollout.base import SamplingConfig

from tapo_ds import engine as eng
from tapo_ds import modeling
from tapo_ds.config import Config, save_config
from tapo_ds.engine import EngineInfo
from tapo_ds.monitor import Monitor
from tapo_ds.reward import GradingPool
from tapo_ds.rollout import TapoRollout


def world_size() -> int:
    """The number of ranks before any engine exists (set by the launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sampling_of(section, samples: int) -> SamplingConfig:
    """The sampling of a config section (``rollout``, ``evaluation``, ``tapo``), ``samples`` per prompt.

    A section without ``top_k`` samples without top-k filtering."""
    return SamplingConfig(max_new_tokens=section.max_new_tokens, temperature=section.temperature,
                          top_p=section.top_p, top_k=getattr(section, "top_k", -1), n_samples_per_prompt=samples)


@dataclass(frozen=True)
class MonitorSpec:
    total_steps: int
    desc: str
    append: bool = False  # a resumed run


@dataclass
class Runtime:
    cfg: Config
    engine: object
    info: EngineInfo
    tokenizer: object
    run_dir: Path
    rollout: object | None = None  # a RolloutEngine
    grader: GradingPool | None = None
    monitor: Monitor | None = None


def load_tokenizer(cfg: Config, path: str | None = None):
    path = path or cfg.model.path
    if path == "tiny":
        return modeling.build_tiny_tokenizer()
    return modeling.load_tokenizer(path, cfg.model.trust_remote_code)


def build_model(cfg: Config, ds_config: dict, path: str | None = None):
    """Model and tokenizer at ``path`` (default ``model.path``); real checkpoints load partitioned under ZeRO-3."""
    path = path or cfg.model.path
    if path == "tiny":
        return modeling.build_tiny_model_and_tokenizer(seed=cfg.seed, **cfg.model.tiny_overrides)
    tokenizer = modeling.load_tokenizer(path, cfg.model.trust_remote_code)
    with eng.zero_init_context(ds_config) as _keep_alive:  # noqa: F841 (must outlive from_pretrained)
        model = modeling.load_model(path, cfg.model.dtype, cfg.model.trust_remote_code)
    return model, tokenizer


def setup_engine(cfg: Config, world: int, micro_batch_size: int, total_steps: int | None = None):
    """The policy under DeepSpeed with its optimizer and LR schedule over ``total_steps`` (default the
    run's): ``(engine, info, tokenizer, ds_config)``."""
    ds_config = eng.load_ds_config(cfg.deepspeed.config, micro_batch_size=micro_batch_size,
                                   world_size=world, grad_clip=cfg.optimizer.grad_clip,
                                   hybrid_engine=cfg.rollout.engine == "hybrid_engine", dtype=cfg.model.dtype)
    model, tokenizer = build_model(cfg, ds_config)
    # from_pretrained returns eval mode, in which HF models skip gradient checkpointing (and dropout): the
    # policy trains in train mode (the rollout switches to eval and back around generation)
    model.train()
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    o = cfg.optimizer
    lr_fn = eng.lr_lambda(o.schedule, o.warmup_steps, total_steps or cfg.total_steps, o.decay_start, o.min_lr_ratio)
    engine, info = eng.build_engine(model, ds_config, lr=o.lr, betas=o.betas, eps=o.eps,
                                    weight_decay=o.weight_decay, lr_fn=lr_fn,
                                    model_type=model.config.model_type)
    return engine, info, tokenizer, ds_config


def inference_engine(cfg: Config, path: str | None = None, micro_batch_size: int = 1):
    """A frozen model under DeepSpeed without optimizer: the same partitioning as training."""
    ds_config = eng.load_ds_config(cfg.deepspeed.config, micro_batch_size=micro_batch_size,
                                   world_size=world_size(), grad_clip=0.0, hybrid_engine=False,
                                   dtype=cfg.model.dtype)
    model, tokenizer = build_model(cfg, ds_config, path)
    engine, info = eng.build_inference_engine(model, ds_config)
    return engine, info, tokenizer


def build_reference(cfg: Config):
    """A frozen copy of the initial policy for the KL term (same loading path, no optimizer)."""
    return inference_engine(cfg, micro_batch_size=cfg.algorithm.micro_batch_size)[0]


def _tapo_rollout(cfg: Config, engine, tokenizer):
    config = engine.module.config
    return TapoRollout(engine, tokenizer, modeling.stop_token_ids(tokenizer, config), tokenizer.pad_token_id,
                       seed=cfg.seed, gather=cfg.rollout.gather, module_factory=modeling.model_factory(config))


def _hybrid_engine_rollout(cfg: Config, engine, tokenizer):
    # DeepSpeed's own rollout: HF generate on the engine's module (its inference kernels where the hybrid
    # engine has them), every row decoded to the longest one; sampling draws from torch's global generator.
    from deepspeed.runtime.rollout import HybridEngineRollout

    return HybridEngineRollout(engine, tokenizer)


ROLLOUT_ENGINES = {"tapo": _tapo_rollout, "hybrid_engine": _hybrid_engine_rollout}


def make_rollout(cfg: Config, engine, tokenizer):
    """The rollout engine ``rollout.engine`` names, over ``engine`` (tests swap in a scripted policy here)."""
    return ROLLOUT_ENGINES[cfg.rollout.engine](cfg, engine, tokenizer)


def prepare_run_dir(cfg: Config, rank: int) -> Path:
    run_dir = cfg.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


@contextlib.contextmanager
def open_runtime(cfg: Config, *, train: bool, total_steps: int | None = None, model_path: str | None = None,
                 rollout: bool = False, grader: bool = False, monitor: MonitorSpec | None = None,
                 run_dir: bool = True) -> Iterator[Runtime]:
    """Build what a stage asks for.

    ``train``: the policy with its optimizer (LR schedule over ``total_steps``), else a frozen model at
    ``model_path`` (default ``model.path``) whose rollout weights are synced once. ``run_dir``: create the
    run folder and save the config there (rank 0)."""
    if train:
        engine, info, tokenizer, _ = setup_engine(cfg, world_size(), cfg.algorithm.micro_batch_size, total_steps)
    else:
        engine, info, tokenizer = inference_engine(cfg, model_path)
    rt = Runtime(cfg=cfg, engine=engine, info=info, tokenizer=tokenizer,
                 run_dir=prepare_run_dir(cfg, info.rank) if run_dir else cfg.run_dir)
    with contextlib.ExitStack() as stack:
        if monitor is not None:
            rt.monitor = Monitor(rt.run_dir, enabled=info.rank == 0, tensorboard=cfg.logging.tensorboard,
                                 progress_bar=cfg.logging.progress_bar, total_steps=monitor.total_steps,
                                 desc=monitor.desc, append=monitor.append)
            stack.callback(rt.monitor.close)
        if rollout:
            rt.rollout = make_rollout(cfg, engine, tokenizer)
            if not train:
                rt.rollout.sync_weights(0)
        if grader:
            r = cfg.reward
            rt.grader = stack.enter_context(GradingPool(num_workers=r.num_workers, timeout=r.timeout,
                                                        memory_mb=r.memory_mb))
        yield rt
