"""Checks of a loaded config against the world, before anything heavy: names looked up in the
algorithm registries, the files it names, the model path, and the state of the run folder.

Each failure is a ``ConfigError`` naming the key path, so ``main`` prints it as the usual one
line (``config error: <key.path>: ...``, exit 2) seconds after the start, on every rank alike.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
from pathlib import Path
from typing import Callable

from tapo_ds.config import Config, ConfigError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# What a training run writes into its folder; their presence means the folder holds a run.
RUN_ARTEFACTS = ("metrics.jsonl", "checkpoints", "tensorboard", "hf")
# The Hub's repository ids: `name` or `org/name`, word characters, `-` and `.`, no `--`/`..`,
# neither starting nor ending with `-` or `.`, at most 96 characters.
_HUB_PART = r"[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?"
_HUB_ID_RE = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")


def check(cfg: Config, resume: str | None) -> None:
    """Everything below, in the order a user would fix it."""
    check_registry_names(cfg)
    check_files(cfg)
    check_run_dir(cfg, resume)


# ----------------------------------------------------------------------------- registries


def _registries() -> dict[str, tuple[Callable[[Config], str], Callable[[], list[str]], str]]:
    """key path -> (its value, the registry's names, what it names). Imported here: the registries
    are torch modules, which ``config.py`` stays free of."""
    from tapo_ds import algorithms as alg
    from tapo_ds.trajectory.backends import backend_names

    return {
        # an algorithm is an advantage estimator, or OPSD (a divergence to a teacher, no advantages)
        "algorithm.name": (lambda c: c.algorithm.name, lambda: [*alg.advantage_estimator_names(), "opsd"],
                           "algorithm"),
        "algorithm.policy_loss": (lambda c: c.algorithm.policy_loss, alg.policy_loss_names, "policy loss"),
        "algorithm.loss_agg": (lambda c: c.algorithm.loss_agg, alg.aggregation_names, "loss aggregation"),
        "algorithm.kl_estimator": (lambda c: c.algorithm.kl_estimator, alg.kl_estimator_names, "KL estimator"),
        "tapo.loss_combination": (lambda c: c.tapo.loss_combination, alg.combination_names, "loss combination"),
        "tapo.equal_reward_groups": (lambda c: c.tapo.equal_reward_groups, alg.equal_reward_rule_names,
                                     "equal-reward rule"),
        "tapo.constructor": (lambda c: c.tapo.constructor, backend_names, "construction backend"),
    }


def check_registry_names(cfg: Config) -> None:
    for key, (value_of, names_of, kind) in _registries().items():
        value, names = value_of(cfg), names_of()
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown {kind} {value!r}{hint}; known: {', '.join(names)}")


# ----------------------------------------------------------------------------- files


def check_files(cfg: Config) -> None:
    """The files and models the stage will read. Relative paths resolve against the working
    directory, as the stages do."""
    if cfg.stage in ("rl", "prefilter", "coldstart"):
        for i, src in enumerate(cfg.data.train_files):
            check_data_source(f"data.train_files[{i}]", src)
    if cfg.stage == "sft":
        for i, src in enumerate(cfg.sft.train_files):
            check_local_file(f"sft.train_files[{i}]", src)
    e = cfg.evaluation
    if cfg.stage in ("rl", "sft") and (e.every or e.at_start):
        for name, src in e.files.items():
            check_data_source(f"evaluation.files.{name}", src)
    if cfg.tapo.template:
        check_template("tapo.template", cfg.tapo.template)
    if cfg.algorithm.name == "opsd" and cfg.opsd.template:
        check_local_file("opsd.template", cfg.opsd.template)
        text = Path(cfg.opsd.template).read_text(encoding="utf-8")
        missing = [p for p in ("{problem}", "{solution}") if p not in text]
        if missing:
            raise ConfigError(f"opsd.template: {cfg.opsd.template}: teacher template is missing "
                              f"placeholder(s) {', '.join(missing)}")
    check_deepspeed_json("deepspeed.config", cfg.deepspeed.config)
    check_model_path("model.path", cfg.model.path)
    if cfg.stage == "coldstart" and cfg.coldstart.constructor == "model" and cfg.coldstart.constructor_path:
        check_model_path("coldstart.constructor_path", cfg.coldstart.constructor_path)


def check_data_source(key: str, src) -> None:
    """A local .jsonl/.json/.parquet file, or a hub dataset id (``name`` or ``org/name``)."""
    if not isinstance(src, str) or not src:
        raise ConfigError(f"{key}: expected a file path or a hub dataset id, got {src!r}")
    path = Path(src)
    if path.exists():
        if not path.is_file() or path.suffix not in DATA_SUFFIXES:
            raise ConfigError(f"{key}: {src}: not a data file (expected {', '.join(DATA_SUFFIXES)})")
        return
    if path.suffix in DATA_SUFFIXES or _looks_local(src) or not _is_hub_id(src):
        raise ConfigError(f"{key}: {src}: no such file (nor a hub dataset id 'name' or 'org/name')")


def check_local_file(key: str, src) -> None:
    if not isinstance(src, str) or not src:
        raise ConfigError(f"{key}: expected a file path, got {src!r}")
    if not Path(src).is_file():
        raise ConfigError(f"{key}: {src}: no such file")


def check_template(key: str, value: str) -> None:
    from tapo_ds.trajectory.prompt import BUILTIN_TEMPLATES, validate_template

    if value in BUILTIN_TEMPLATES:
        return
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{key}: {value}: no such file (nor a built-in: {', '.join(sorted(BUILTIN_TEMPLATES))})")
    try:
        validate_template(path.read_text(encoding="utf-8"), source=value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


def check_deepspeed_json(key: str, value: str) -> None:
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{key}: {value}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: {value}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {value}: expected a JSON object, got {type(data).__name__}")


def check_model_path(key: str, value: str) -> None:
    """``tiny``, an existing model folder, or a hub model id ``org/name``."""
    if value == "tiny" or Path(value).is_dir():
        return
    if Path(value).exists():
        raise ConfigError(f"{key}: {value}: a file; expected 'tiny', a model folder or a hub id 'org/name'")
    if _looks_local(value) or "/" not in value or not _is_hub_id(value):
        raise ConfigError(f"{key}: {value}: no such folder, and not a hub model id 'org/name' (or 'tiny')")


def _is_hub_id(value: str) -> bool:
    return len(value) <= 96 and "--" not in value and ".." not in value and bool(_HUB_ID_RE.fullmatch(value))


def _looks_local(value: str) -> bool:
    """A path by its form (``./x``, ``/x``, ``~/x``, ``a\\b``), or ``dir/x`` where ``dir`` is a local
    folder: a typo of a local path, not a hub id."""
    if value.startswith((".", "/", "~")) or "\\" in value:
        return True
    head, sep, _ = value.partition("/")
    return bool(sep) and Path(head).is_dir()


# ----------------------------------------------------------------------------- the run folder


def existing_run(run_dir: Path) -> list[str]:
    return [name for name in RUN_ARTEFACTS if (run_dir / name).exists()]


def check_run_dir(cfg: Config, resume: str | None) -> None:
    """A fresh run must not mix into an earlier one's records; ``overwrite`` clears them first."""
    if cfg.stage not in ("rl", "sft"):
        return
    if cfg.overwrite and resume:
        raise ConfigError("overwrite: true clears the run folder and --resume continues it; pass only one")
    found = existing_run(cfg.run_dir)
    if found and not resume and not cfg.overwrite:
        raise ConfigError(f"name: {cfg.run_dir} already holds a run ({', '.join(found)}); continue it with "
                          f"--resume auto, pick another name (--set name=...), or start it over with "
                          f"--set overwrite=true")


def clear_run_dir(cfg: Config, rank: int) -> None:
    """``overwrite: true``: remove what an earlier run wrote (rank 0, before anything is written).
    Only the run's own records go; other files in the folder (e.g. data) stay."""
    if not cfg.overwrite or rank != 0 or cfg.stage not in ("rl", "sft"):
        return
    for name in RUN_ARTEFACTS + ("config.yaml",):
        path = cfg.run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
