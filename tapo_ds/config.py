"""Typed configuration: YAML (with ``include``) -> dataclasses, ``--set`` overrides, validation.

Every error is one line that names the key path and what was expected, so a typo in a
500-step run's config fails at second 0, not at step 499.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad key or value; the message starts with the key path."""


def _f(default=dataclasses.MISSING, *, lo=None, hi=None, lo_open=False, doc="", factory=None):
    """A field with a range check: ``lo <= v <= hi`` (``lo < v`` when ``lo_open``)."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    # "tiny" builds the tiny Qwen3 from config (offline); anything else is a hub id or a folder.
    path: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # Passed to the chat template; Qwen3's non-thinking mode is the paper's setting.
    chat_template_kwargs: dict = _f(factory=lambda: {"enable_thinking": False})
    tiny_overrides: dict = _f(factory=dict, doc="Qwen3Config overrides for path=tiny")
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train_files: list = _f(factory=list, doc="jsonl/parquet files or a hub dataset id")
    split: str = "train"
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str = _f("", doc="a reference solution per row, for OPSD's teacher (empty = rows have none)")
    prompt_template: str = (
        "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    max_prompt_tokens: int = _f(1024, lo=1)
    shuffle: bool = True
    limit: int = _f(0, lo=0, doc="keep only the first N rows (0 = all)")


@dataclass
class RolloutConfig:
    questions_per_step: int = _f(32, lo=1, doc="B, per optimizer step over all ranks")
    samples_per_question: int = _f(8, lo=1, doc="K")
    max_new_tokens: int = _f(2048, lo=1)
    temperature: float = _f(1.0, lo=0.0)
    top_p: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    top_k: int = -1
    gather: Literal["once", "per_step"] = "once"
    engine: Literal["tapo", "hybrid_engine"] = _f(
        "tapo", doc="tapo: the project's decode loop (rows leave as they end); hybrid_engine: DeepSpeed's "
                    "HybridEngineRollout (its inference kernels on CUDA for the model types that have them)")
    dynamic_sampling: bool = _f(False, doc="DAPO: drop groups with equal rewards, sample more questions until "
                                           "the step has B informative groups")
    dynamic_sampling_max_rounds: int = _f(3, lo=1, doc="extra rollout calls a step may make to fill its groups")


@dataclass
class AlgorithmConfig:
    name: Literal["grpo", "tapo", "opsd"] = "grpo"
    policy_loss: str = "ppo_clip"
    clip_low: float = _f(0.2, lo=0.0, hi=1.0)
    clip_high: float = _f(0.2, lo=0.0)
    adv_eps: float = _f(1e-6, lo=0.0, lo_open=True)
    loss_agg: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"
    kl_coef: float = _f(0.0, lo=0.0)
    kl_estimator: Literal["k1", "k3"] = "k3"
    log_kl_to_init: bool = False
    ppo_epochs: int = _f(1, lo=1)
    mini_batches: int = _f(1, lo=1, doc="optimizer steps per rollout per epoch")
    micro_batch_size: int = _f(8, lo=1, doc="sequences per forward/backward per rank")
    mask_truncated: bool = _f(False, doc="DAPO: responses cut at rollout.max_new_tokens get no loss")


@dataclass
class TapoConfig:
    n_pos: int = _f(2, lo=1)
    n_neg: int = _f(4, lo=1)
    m_max: int = _f(4, lo=1)
    lam: float = _f(1.0, lo=0.0, doc="weight of the constructed-sample loss")
    loss_combination: Literal["pooled", "separate"] = _f(
        "pooled", doc="pooled: one aggregation over originals + constructed; separate: mean + lam * mean")
    decoupled_advantages: bool = True
    equal_reward_groups: Literal["zero", "reward"] = _f(
        "zero", doc="advantage of a reflected group of size >= 2 with equal rewards: 0 (paper) or r")
    ots: bool = True
    ots_w_min: float = _f(0.01, lo=0.0)
    ots_w_max: float = _f(10.0, lo=0.0, lo_open=True)
    keep_failed_constructions: bool = True
    prefix_loss: Literal["train", "mask"] = _f(
        "train", doc="the constructed samples' tokens before the reflection (re-typed from the wrong answer): "
                     "in the loss (train, the paper) or masked out of it (mask, beyond the paper)")
    constructor: str = _f("policy", doc="who writes the constructions: policy (the method) or a registered "
                                        "construction backend, e.g. synthetic_oracle (the synthetic task's rules)")
    oracle_accuracy: float = _f(1.0, lo=0.0, hi=1.0,
                                doc="synthetic_oracle: probability that a construction's correction is right")
    construction: Literal["micro", "full"] = "micro"
    prefix: Literal["regenerate", "splice"] = "regenerate"
    template: str = _f("", doc="construction prompt file; empty = built-in for `construction`")
    max_prompt_tokens: int = _f(4096, lo=1, doc="construction context budget")
    max_new_tokens: int = _f(2048, lo=1)
    temperature: float = _f(1.0, lo=0.0)
    top_p: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    in_rollout: bool = _f(False, doc="start a question's constructions inside the rollout, as soon as its samples "
                                     "are graded (same method, another schedule); false: after the whole rollout")
    lookup_draft_tokens: int = _f(0, lo=0, doc="constructions verify up to this many tokens copied from their prompt "
                                                "per forward (prompt-lookup drafts: same distribution, fewer "
                                                "forwards, each wider; 0 = off, measured slower on CPU)")
    lookup_min_match: int = _f(3, lo=1, doc="a draft is copied from where the last N written tokens recur in the "
                                            "construction prompt")
    examples_every: int = _f(10, lo=0, doc="log full constructions as text every N steps")
    examples: int = _f(2, lo=0)


@dataclass
class OpsdConfig:
    """On-policy self-distillation: the teacher is the model given the question and a correct solution."""
    privileged: Literal["solution", "group"] = _f(
        "solution", doc="solution: the row's reference (data.solution_field), else a right answer of the group; "
                        "group: a right answer of the group")
    teacher: Literal["live", "frozen"] = _f("live", doc="live: the current weights; frozen: the initial ones")
    template: str = _f("", doc="teacher prompt file with {problem} and {solution}; empty = built-in")
    beta: float = _f(0.5, lo=0.0, hi=1.0, doc="generalized JSD: 0 = KL(teacher || student), 1 = KL(student || teacher)")
    temperature: float = _f(1.0, lo=0.0, lo_open=True)
    teacher_top_k: int = _f(0, lo=0, doc="restrict both distributions to the teacher's top k (0 = full vocabulary)")
    pointwise_clip: float = _f(0.0, lo=0.0, doc="cap on each vocabulary entry's contribution (0 = none)")
    chunk_tokens: int = _f(512, lo=1, doc="response positions per divergence chunk (bounds peak memory)")


@dataclass
class EvaluationConfig:
    """In-training evaluation on held-out problems (the protocol of docs/method.md §Evaluation by default)."""
    every: int = _f(0, lo=0, doc="steps between evaluations (0 = off)")
    at_start: bool = False
    files: dict = _f(factory=dict, doc="name -> jsonl/parquet file or hub dataset (data.*_field names)")
    limit: int = _f(0, lo=0, doc="first N problems of each set (0 = all)")
    samples: int = _f(5, lo=1, doc="n samples per problem")
    ks: list = _f(factory=lambda: [1, 2, 3, 4, 5])
    temperature: float = _f(0.6, lo=0.0)
    top_p: float = _f(0.9, lo=0.0, hi=1.0, lo_open=True)
    max_new_tokens: int = _f(2048, lo=1)
    batch_questions: int = _f(8, lo=1, doc="problems per generate call per rank")


@dataclass
class RewardConfig:
    num_workers: int = _f(2, lo=1)
    timeout: float = _f(5.0, lo=0.0, lo_open=True)
    memory_mb: int = _f(2048, lo=0, doc="address space a grading worker may add (0 = no cap)")
    overlong_window: int = _f(0, lo=0, doc="DAPO: soft overlong punishment over the last N tokens before "
                                           "rollout.max_new_tokens (0 = off)")
    overlong_penalty: float = _f(1.0, lo=0.0, doc="the reward lost at rollout.max_new_tokens")


@dataclass
class OptimizerConfig:
    lr: float = _f(1e-6, lo=0.0)
    weight_decay: float = _f(0.0, lo=0.0)
    betas: list = _f(factory=lambda: [0.9, 0.999])
    eps: float = _f(1e-8, lo=0.0, lo_open=True)
    warmup_steps: int = _f(0, lo=0)
    schedule: Literal["constant", "cosine", "constant_then_cosine"] = "constant"
    decay_start: float = _f(0.0, lo=0.0, hi=1.0, doc="fraction of steps before cosine starts")
    min_lr_ratio: float = _f(0.0, lo=0.0, hi=1.0)
    grad_clip: float = _f(1.0, lo=0.0)


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero3_cpu.json"


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    text_every: int = _f(10, lo=0, doc="log sample prompts/responses every N steps")
    text_samples: int = _f(2, lo=0)
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    every: int = _f(50, lo=0, doc="0 = only at the end")
    keep_last: int = _f(2, lo=1)
    export_hf: bool = True


@dataclass
class SFTConfig:
    train_files: list = _f(factory=list, doc="jsonl with prompt/response")
    prompt_field: str = "prompt"
    response_field: str = "response"
    max_seq_tokens: int = _f(2048, lo=2)
    batch_size: int = _f(16, lo=1, doc="sequences per optimizer step over all ranks")
    epochs: int = _f(1, lo=1)
    max_steps: int = _f(0, lo=0, doc="stop after N steps (0 = all epochs); the LR schedule still spans "
                                       "the epochs, so a stopped run equals the same step of a full one")


@dataclass
class PrefilterConfig:
    """``stage: prefilter``: keep the questions of data.train_files the model solves at a pass rate in
    [low, high] (docs/method.md §Prefilter), sampling with the rollout section's settings."""
    output: str = _f("", doc="filtered jsonl (default: <run dir>/filtered.jsonl)")
    samples: int = _f(8, lo=1)
    low: float = _f(0.125, lo=0.0, hi=1.0)
    high: float = _f(0.875, lo=0.0, hi=1.0)
    batch_questions: int = _f(16, lo=1, doc="questions per generate call per rank")


@dataclass
class ColdStartConfig:
    """``stage: coldstart``: build SFT-format and IFT-format cold-start data (docs/method.md §Cold start) from
    data.train_files, sampling with the rollout section and constructing with tapo.* settings."""
    output_dir: str = _f("", doc="where the two jsonl files go (default: the run dir)")
    samples: int = _f(8, lo=1)
    constructor: Literal["model", "rule"] = "model"
    constructor_path: str = _f("", doc="a different (stronger) model for constructions; empty = model.path")
    n_pos: int = _f(1, lo=1)
    n_neg: int = _f(1, lo=1)
    m_max: int = _f(4, lo=1)
    min_fidelity: float = _f(0.0, lo=0.0, hi=1.0)
    batch_questions: int = _f(16, lo=1)
    examples: int = _f(3, lo=0)


@dataclass
class Config:
    name: str = "run"
    stage: Literal["rl", "sft", "prefilter", "coldstart"] = "rl"
    seed: int = 1
    output_dir: str = "runs"
    overwrite: bool = _f(False, doc="a fresh run clears what an earlier run left in <output_dir>/<name> "
                                    "(otherwise such a folder is refused; --resume continues it)")
    total_steps: int = _f(500, lo=1)
    torch_threads: int = _f(0, lo=0, doc="0 = leave torch's default")
    model: ModelConfig = _f(factory=ModelConfig)
    data: DataConfig = _f(factory=DataConfig)
    rollout: RolloutConfig = _f(factory=RolloutConfig)
    algorithm: AlgorithmConfig = _f(factory=AlgorithmConfig)
    tapo: TapoConfig = _f(factory=TapoConfig)
    opsd: OpsdConfig = _f(factory=OpsdConfig)
    reward: RewardConfig = _f(factory=RewardConfig)
    evaluation: EvaluationConfig = _f(factory=EvaluationConfig)
    optimizer: OptimizerConfig = _f(factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = _f(factory=DeepSpeedConfig)
    logging: LoggingConfig = _f(factory=LoggingConfig)
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig)
    sft: SFTConfig = _f(factory=SFTConfig)
    prefilter: PrefilterConfig = _f(factory=PrefilterConfig)
    coldstart: ColdStartConfig = _f(factory=ColdStartConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read YAML (resolving ``include``), apply ``key.path=value`` overrides, validate."""
    raw = _read_with_includes(Path(path), seen=())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        _set_path(raw, key.strip().split("."), _Override(_yaml_value(value, key), value))
    cfg = build(Config, raw, "")
    _check_cross_fields(cfg)
    return cfg


@dataclass(frozen=True)
class _Override:
    """A ``--set`` value: YAML-parsed, with the raw text kept for string fields, where YAML
    would otherwise turn ``{problem}`` into a mapping or ``yes`` into a bool."""
    parsed: Any
    raw: str


def _yaml_value(text: str, key: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML: a plain string (validated against the field's type below)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _read_with_includes(path: Path, seen: tuple) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    includes = data.pop("include", [])
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        _deep_merge(merged, _read_with_includes((path.parent / inc).resolve(), seen + (path,)))
    _deep_merge(merged, data)
    return merged


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k not in _OPAQUE_DICTS:
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


_OPAQUE_DICTS = ("chat_template_kwargs", "tiny_overrides")


def _set_path(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
    node[keys[-1]] = value


def build(cls, raw: Any, where: str):
    """Build dataclass ``cls`` from ``raw``, checking keys, types and ranges."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or '<root>'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}; known: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        path = _join(where, name)
        value = raw[name]
        if isinstance(value, _Override):
            value = value.raw if hints[name] is str else value.parsed
        kwargs[name] = _coerce(hints[name], value, path)
        _check_range(f.metadata, kwargs[name], path)
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(tp, value, path):
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `3e-6` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is list:
        if isinstance(value, str):
            return [value]  # a single file is a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _check_range(meta, value, path):
    lo, hi = meta.get("lo"), meta.get("hi")
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"{path}: expected a value {op} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{path}: expected a value <= {hi}, got {value!r}")


def _check_cross_fields(cfg: Config) -> None:
    t = cfg.tapo
    if cfg.algorithm.name == "tapo" and t.n_pos + t.n_neg > cfg.rollout.samples_per_question:
        raise ConfigError(
            f"tapo.n_pos + tapo.n_neg: {t.n_pos} + {t.n_neg} exceeds rollout.samples_per_question "
            f"= {cfg.rollout.samples_per_question}, so no question could ever be selected")
    if t.ots_w_min > t.ots_w_max:
        raise ConfigError(f"tapo.ots_w_min: {t.ots_w_min} exceeds tapo.ots_w_max = {t.ots_w_max}")
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas: expected two numbers, got {cfg.optimizer.betas!r}")
    if cfg.prefilter.low > cfg.prefilter.high:
        raise ConfigError(f"prefilter.low: {cfg.prefilter.low} exceeds prefilter.high = {cfg.prefilter.high}")
    if cfg.stage in ("rl", "prefilter", "coldstart") and not cfg.data.train_files:
        raise ConfigError("data.train_files: expected at least one file or hub dataset for stage rl")
    if cfg.stage == "sft" and not cfg.sft.train_files:
        raise ConfigError("sft.train_files: expected at least one jsonl file for stage sft")
    bad_ks = [k for k in cfg.evaluation.ks if not isinstance(k, int) or not 1 <= k <= cfg.evaluation.samples]
    if bad_ks:
        raise ConfigError(f"evaluation.ks: {bad_ks} must be integers in 1..evaluation.samples "
                          f"= {cfg.evaluation.samples}")
    if "{problem}" not in cfg.data.prompt_template:
        raise ConfigError("data.prompt_template: must contain the {problem} placeholder")
