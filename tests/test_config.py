"""Config: one-line errors naming the key path; includes; overrides; the shipped configs load."""

from pathlib import Path

import pytest
import yaml

from tapo_ds.config import Config, ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


BASE = {"data": {"train_files": ["x.jsonl"]}}


@pytest.mark.parametrize("data, message", [
    ({"rollout": {"sample_per_question": 8}}, "rollout.sample_per_question: unknown key (did you mean 'samples_per_question'?)"),
    ({"rollout": {"samples_per_question": "8"}}, "rollout.samples_per_question: expected an integer, got '8'"),
    ({"rollout": {"samples_per_question": 0}}, "rollout.samples_per_question: expected a value >= 1, got 0"),
    ({"rollout": {"top_p": 0.0}}, "rollout.top_p: expected a value > 0.0"),
    ({"algorithm": {"name": "ppo"}}, "algorithm.name: expected one of ['grpo', 'tapo'], got 'ppo'"),
    ({"algorithm": {"clip_low": 1.5}}, "algorithm.clip_low: expected a value <= 1.0, got 1.5"),
    ({"tapo": {"ots": "yes"}}, "tapo.ots: expected true/false, got 'yes'"),
    ({"algorithm": {"name": "tapo"}, "tapo": {"n_pos": 5, "n_neg": 4}}, "tapo.n_pos + tapo.n_neg"),
    ({"model": 3}, "model: expected a mapping"),
    ({"data": {"train_files": []}}, "data.train_files: expected at least one"),
])
def test_errors_name_the_key(tmp_path, data, message):
    merged = {**BASE, **data} if "data" not in data else data
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, merged))
    assert str(exc.value).startswith(message.split(":")[0] + ":")
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_include_and_overrides(tmp_path):
    write(tmp_path, {**BASE, "rollout": {"samples_per_question": 8, "max_new_tokens": 64}}, "base.yaml")
    child = write(tmp_path, {"include": "base.yaml", "rollout": {"max_new_tokens": 32}, "name": "child"})
    cfg = load_config(child, ["algorithm.name=tapo", "tapo.m_max=2", "optimizer.lr=3e-6"])
    assert cfg.rollout.samples_per_question == 8 and cfg.rollout.max_new_tokens == 32
    assert cfg.algorithm.name == "tapo" and cfg.tapo.m_max == 2 and cfg.optimizer.lr == 3e-6
    assert cfg.name == "child"
    with pytest.raises(ConfigError, match="--set 'oops': expected key.path=value"):
        load_config(child, ["oops"])
    with pytest.raises(ConfigError, match="tapo.nope: unknown key"):
        load_config(child, ["tapo.nope=1"])


def test_include_cycle_and_missing_file(tmp_path):
    write(tmp_path, {"include": "b.yaml"}, "a.yaml")
    write(tmp_path, {"include": "a.yaml"}, "b.yaml")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["tapo.lam=0.5"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and isinstance(again, Config)


def test_shipped_configs_load():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert paths
    for path in paths:
        load_config(path)
