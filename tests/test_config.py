"""Config: one-line errors naming the key path; includes; overrides; the shipped configs load."""

import re
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
    ({"algorithm": {"name": "ppo"}}, "algorithm.name: expected one of ['grpo', 'tapo', 'opsd'], got 'ppo'"),
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


# ----------------------------------------------------------------------------- preflight: before anything heavy

TINY = REPO / "configs" / "tiny.yaml"
TRAIN = str(REPO / "data" / "quickstart" / "train.jsonl")


def preflight_error(tmp_path, sets, resume=None, config=TINY):
    from tapo_ds import preflight

    cfg = load_config(config, [f"output_dir={tmp_path}"] + sets)
    with pytest.raises(ConfigError) as exc:
        preflight.check(cfg, resume)
    message = str(exc.value)
    assert "\n" not in message
    return message


def preflight_ok(tmp_path, sets, resume=None):
    from tapo_ds import preflight

    preflight.check(load_config(TINY, [f"output_dir={tmp_path}"] + sets), resume)


@pytest.mark.parametrize("sets, message", [
    (["algorithm.policy_loss=ppo_clp"],
     "algorithm.policy_loss: unknown policy loss 'ppo_clp' (did you mean 'ppo_clip'?); known: "),
    (["tapo.template=nope/template.txt"], "tapo.template: nope/template.txt: no such file (nor a built-in: full, micro)"),
    ([f"data.train_files=[{TRAIN}, data/x.jsonl]"],
     "data.train_files[1]: data/x.jsonl: no such file (nor a hub dataset id 'name' or 'org/name')"),
    (["data.train_files=[./foo]"], "data.train_files[0]: ./foo: no such file"),
    (["data.train_files=[data/quickstart/typo]"], "data.train_files[0]: data/quickstart/typo: no such file"),
    (["data.train_files=[a/b/c]"], "data.train_files[0]: a/b/c: no such file"),
    (["data.train_files=[data/quickstart]"], "data.train_files[0]: data/quickstart: not a data file"),
    (["evaluation.files={heldout: data/quickstart/tset.jsonl}"],
     "evaluation.files.heldout: data/quickstart/tset.jsonl: no such file"),
    (["stage=sft", "sft.train_files=[nope.jsonl]"], "sft.train_files[0]: nope.jsonl: no such file"),
    (["deepspeed.config=ds_configs/nope.json"], "deepspeed.config: ds_configs/nope.json: no such file"),
    (["deepspeed.config=configs/tiny.yaml"], "deepspeed.config: configs/tiny.yaml: invalid JSON"),
    (["model.path=checkpoints/typo"],
     "model.path: checkpoints/typo: no such folder, and not a hub model id 'org/name' (or 'tiny')"),
    (["model.path=a/b/c"], "model.path: a/b/c: no such folder"),
    (["model.path=gpt2"], "model.path: gpt2: no such folder"),
    (["model.path=configs/tiny.yaml"], "model.path: configs/tiny.yaml: a file"),
])
def test_preflight_errors_name_the_key(tmp_path, monkeypatch, sets, message):
    monkeypatch.chdir(REPO)  # relative paths resolve against the working directory
    assert preflight_error(tmp_path, sets).startswith(message)


def test_preflight_template_placeholders(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("{question} {wrong}")
    assert preflight_error(tmp_path, [f"tapo.template={bad}"]) == (
        f"tapo.template: {bad}: construction template is missing placeholder(s) {{right}}")


def test_preflight_accepts(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    tpl = tmp_path / "t.txt"
    tpl.write_text("{question} {wrong} {right}")
    for sets in ([], ["data.train_files=[openai/gsm8k, gsm8k, data/quickstart/train.jsonl]"],
                 ["model.path=Qwen/Qwen3-8B"], ["model.path=checkpoints/miniature-coldstart"],
                 [f"tapo.template={tpl}"], ["tapo.template=full"],
                 # files a stage does not read are not its concern
                 ["evaluation.every=0", "evaluation.files={heldout: nope.jsonl}"],
                 ["stage=sft", f"sft.train_files=[{TRAIN}]", "data.train_files=[nope.jsonl]"]):
        preflight_ok(tmp_path, sets)


def test_preflight_refuses_a_folder_that_holds_a_run(tmp_path):
    from tapo_ds import preflight

    run_dir = tmp_path / "tiny"
    preflight_ok(tmp_path, [])  # no folder yet
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: tiny\n")
    (run_dir / "notes.txt").write_text("mine")
    preflight_ok(tmp_path, [])  # a config alone is not a run
    (run_dir / "tensorboard").mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    assert preflight_error(tmp_path, []) == (
        f"name: {run_dir} already holds a run (metrics.jsonl, tensorboard); continue it with --resume auto, "
        f"pick another name (--set name=...), or start it over with --set overwrite=true")
    preflight_ok(tmp_path, [], resume="auto")
    preflight_ok(tmp_path, ["overwrite=true"])
    preflight_ok(tmp_path, ["stage=prefilter"])  # writes no run records
    assert preflight_error(tmp_path, ["overwrite=true"], resume="auto").startswith("overwrite: true clears")

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "overwrite=true"])
    preflight.clear_run_dir(cfg, rank=1)  # only rank 0 clears
    assert (run_dir / "metrics.jsonl").exists()
    preflight.clear_run_dir(cfg, rank=0)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def test_main_reports_preflight_errors_at_once(tmp_path, capsys, monkeypatch):
    import tapo_ds.engine
    from tapo_ds.main import main

    def never(*a, **k):
        raise AssertionError("the process group started before the config was checked")

    monkeypatch.setattr(tapo_ds.engine, "init_distributed", never)
    code = main(["--config", str(TINY), f"--set=output_dir={tmp_path}", "--set", "algorithm.policy_loss=ppo_clp"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "config error: algorithm.policy_loss: unknown policy loss 'ppo_clp' (did you mean 'ppo_clip'?)"), lines
    assert not (tmp_path / "tiny").exists()


def test_unknown_flag(capsys):
    from tapo_ds.main import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", str(TINY), "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# Shipped configs that read what an earlier step of the pipeline makes.
NEEDS_EARLIER_STEP = {
    "configs/ablations/sft_micro_reflective.yaml": "sft.train_files[0]: runs/qwen3_8b_tapo/coldstart_sft.jsonl",
    "configs/smoke/smollm2_tapo.yaml": "model.path: .cache/models/smollm2-135m-instruct: no such folder",
}


def _earlier_step_done(cfg) -> bool:
    # A user (or the slow smoke test) may have fetched the model or built the data already.
    wanted = (list(cfg.sft.train_files) if cfg.stage == "sft" else []) + \
        ([cfg.model.path] if cfg.model.path != "tiny" else [])
    return all(Path(w).exists() for w in wanted)


def test_shipped_configs_pass_preflight(tmp_path, monkeypatch):
    from tapo_ds import preflight

    monkeypatch.chdir(REPO)
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        rel = str(path.relative_to(REPO))
        cfg = load_config(path, [f"output_dir={tmp_path}"])
        if rel in NEEDS_EARLIER_STEP and not _earlier_step_done(cfg):
            with pytest.raises(ConfigError, match=re.escape(NEEDS_EARLIER_STEP[rel])):
                preflight.check(cfg, None)
        else:
            preflight.check(cfg, None)
