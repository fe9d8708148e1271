"""DeepSpeed: distributed init, ``deepspeed.initialize``, hybrid-engine detection and fallback.

Only this module and ``rollout.py`` call DeepSpeed's API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Model types for which DeepSpeed's hybrid engine swaps in its inference kernels
# (deepspeed/module_inject/containers); those kernels are CUDA-only.
_DS_KERNEL_MODEL_TYPES = frozenset({
    "llama", "llama2", "opt", "gpt2", "gptj", "gpt_neo", "gpt_neox", "bloom", "bert", "distilbert",
    "clip", "internlm", "megatron-gpt"})


@dataclass
class EngineInfo:
    world_size: int
    rank: int
    local_rank: int
    zero_stage: int
    hybrid_engine: bool
    hybrid_reason: str
    device: torch.device


def init_distributed() -> None:
    """Bring up torch.distributed (nccl on GPU, gloo on CPU), also for a plain ``python`` run."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    backend = get_accelerator().communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_ds_config(path: str | Path, *, micro_batch_size: int, world_size: int, grad_clip: float,
                   hybrid_engine: bool, dtype: str) -> dict:
    """Read the JSON and fill in what the trainer owns (batch sizes, clipping, precision).

    Gradient accumulation is caller-managed (``managed_gradient_accumulation: false``): a TAPO
    step has a variable number of micro-batches, so the trainer calls ``step()`` itself.
    """
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"deepspeed.config: file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"deepspeed.config: {path}: invalid JSON: {exc}") from None
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = micro_batch_size * world_size
    cfg["managed_gradient_accumulation"] = False
    cfg["gradient_clipping"] = grad_clip
    cfg.setdefault("steps_per_print", 10**9)
    cfg["bf16"] = {"enabled": dtype == "bfloat16"}
    cfg["fp16"] = {"enabled": dtype == "float16"}
    cfg.setdefault("hybrid_engine", {})["enabled"] = hybrid_engine
    return cfg


def hybrid_engine_support(model_type: str, on_cuda: bool) -> tuple[bool, str]:
    """Whether DeepSpeed's hybrid engine helps here, and why not when it does not."""
    if not on_cuda:
        if model_type in _DS_KERNEL_MODEL_TYPES:
            return False, f"its inference kernels for {model_type} are CUDA-only"
        return False, f"no inference kernels for {model_type}, so no acceleration on CPU"
    if model_type not in _DS_KERNEL_MODEL_TYPES:
        return False, f"no inference kernels for {model_type}"
    return True, "inference kernels available"


def zero_init_context(ds_config: dict):
    """Partitioned loading for ZeRO-3 (as DeepSpeed-Chat does): keep the returned object alive
    while ``from_pretrained`` runs so transformers builds the model inside ``zero.Init``."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return contextlib.nullcontext(None)
    from transformers.integrations import HfDeepSpeedConfig

    return contextlib.nullcontext(HfDeepSpeedConfig(ds_config))


def lr_lambda(schedule: str, warmup: int, total: int, decay_start: float, min_ratio: float):
    """Linear warm-up, then constant, cosine, or constant followed by cosine."""
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        start = warmup if schedule == "cosine" else max(warmup, int(decay_start * total))
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total - start))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def build_engine(model: torch.nn.Module, ds_config: dict, *, lr: float, betas, eps: float,
                 weight_decay: float, lr_fn, model_type: str):
    """``deepspeed.initialize`` with torch's AdamW (DeepSpeed's own Adam needs a JIT build)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_cuda = get_accelerator().device_name() == "cuda"
    want_hybrid = ds_config.get("hybrid_engine", {}).get("enabled", False)
    hybrid, reason = hybrid_engine_support(model_type, on_cuda) if want_hybrid else (False, "disabled in config")
    if want_hybrid and not hybrid and int(os.environ.get("RANK", "0")) == 0:
        log.warning("hybrid engine off: %s; rollout.engine hybrid_engine generates with HF generate on the "
                    "engine's module", reason)
    ds_config = dict(ds_config, hybrid_engine=dict(ds_config.get("hybrid_engine", {}), enabled=hybrid))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine, _info(engine, hybrid, reason)


def build_inference_engine(model: torch.nn.Module, ds_config: dict):
    """A frozen model under DeepSpeed without optimizer (the KL reference, prefilter, data builder):
    the same ZeRO partitioning as training, so an 8B reference fits where the policy does."""
    import deepspeed

    model.eval().requires_grad_(False)
    zero = dict(ds_config.get("zero_optimization", {}))
    if int(zero.get("stage", 0)) in (1, 2):
        # ZeRO-1/2 partition optimizer states and gradients, which a frozen model has none of (and DeepSpeed
        # refuses them without an optimizer): the weights are whole on every rank either way
        ds_config = dict(ds_config, zero_optimization=dict(zero, stage=0))
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    return engine, _info(engine, False, "inference only")


def _info(engine, hybrid: bool, reason: str) -> EngineInfo:
    return EngineInfo(
        world_size=torch.distributed.get_world_size(),
        rank=torch.distributed.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        zero_stage=engine.zero_optimization_stage(),
        hybrid_engine=hybrid,
        hybrid_reason=reason,
        device=engine.device,
    )


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce that is a no-op without a process group (tests, single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(tensor, op=ops[op])
    return tensor


def gathered_state_dict(engine) -> dict:
    """The full (un-partitioned) weights on every rank, for export."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict() or {}
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
