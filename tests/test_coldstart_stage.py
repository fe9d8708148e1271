"""`stage: coldstart` end to end: the shipped cold-start checkpoint with the rule constructor and with
the model constructor (separate process, as a user launches it), and the model constructor on a scripted
policy through ``tapo_ds.main.main`` so that every branch (unparsable, wrong, verified) fires by design."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

from tapo_ds import runtime
from tapo_ds.data import write_jsonl
from tapo_ds.main import main
from tapo_ds.scripted import ScriptedRollout
from tapo_ds.synthetic.constructor import construct
from tapo_ds.synthetic.errors import ERROR_KINDS, corrupt
from tapo_ds.synthetic.task import generate_dataset
from tapo_ds.trajectory import DEFAULT_CONSTRUCTION_TEMPLATE, parse_construction, render_construction_prompt

REPO = Path(__file__).resolve().parent.parent
STATS_RE = re.compile(r"cold-start data from (\d+) questions x (\d+) samples \((\d+) over data.max_prompt_tokens "
                      r"skipped\): (.*)")
STAT_KEYS = ("questions", "responses", "candidates", "pairs", "too_long", "constructed", "parsed", "verified",
             "low_fidelity", "duplicates", "kept_sft", "kept_ift")


def parse_stats(stdout: str) -> dict:
    """The stats line the stage prints, as {key: int}."""
    found = STATS_RE.search(stdout)
    assert found, stdout[-3000:]
    stats = {k: int(v) for k, v in re.findall(r"(\w+) (\d+)(?=,|$)", found.group(4))}
    assert set(STAT_KEYS) <= set(stats), found.group(0)
    return stats


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def gold_by_problem(path: Path) -> dict:
    return {row["problem"]: str(row["answer"]) for row in read_jsonl(path)}


def check_rows(out_dir: Path, stats: dict, gold: dict, construction_template: str) -> tuple[list, list]:
    """What every coldstart run writes, whatever produced the constructions."""
    sft, ift = read_jsonl(out_dir / "coldstart_sft.jsonl"), read_jsonl(out_dir / "coldstart_ift.jsonl")
    assert (len(sft), len(ift)) == (stats["kept_sft"], stats["kept_ift"])
    assert stats["constructed"] <= stats["pairs"] - stats["too_long"]
    assert stats["verified"] <= stats["parsed"] <= stats["constructed"]
    assert stats["kept_sft"] == stats["verified"] - stats["low_fidelity"] - stats["duplicates"]
    for row in sft:
        assert set(row) == {"prompt", "response", "kind"} and row["kind"] == "sft"
        assert row["prompt"] in gold  # data.prompt_template is "{problem}"
        assert row["response"].rstrip().endswith(f"\\boxed{{{gold[row['prompt']]}}}")  # verified
    for row in ift:
        assert set(row) == {"prompt", "response", "kind"} and row["kind"] == "ift"
        problems = [p for p in gold if p in row["prompt"]]
        assert len(problems) == 1, row["prompt"][:300]
        assert row["prompt"].startswith(construction_template.split("{", 1)[0])
        parsed = parse_construction(row["response"])
        assert parsed is not None and parsed.analysis
        assert row["response"] == f"<analysis>{parsed.analysis}</analysis><reconstruction>{parsed.reconstruction}" \
                                  "</reconstruction>"
        assert parsed.reconstruction.rstrip().endswith(f"\\boxed{{{gold[problems[0]]}}}")
    return sft, ift


def run_shipped(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    """`python tapo_ds/main.py --config configs/quickstart.yaml --set stage=coldstart ...` on 16 questions
    (enough for some to be answered both right and wrong, which is what pairs need)."""
    cmd = [sys.executable, str(REPO / "tapo_ds" / "main.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
           "--set", "stage=coldstart", "--set", "name=cs", "--set", f"output_dir={tmp_path}",
           "--set", "data.limit=16", "--set", "coldstart.samples=4", "--set", "coldstart.m_max=2",
           "--set", "reward.num_workers=1", "--set", "torch_threads=1", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = parse_stats(proc.stdout)
    assert stats["questions"] == 16 and stats["responses"] == 64
    assert re.search(r"^wrote .*coldstart_sft\.jsonl, .*coldstart_ift\.jsonl$", proc.stdout, re.M)
    assert (tmp_path / "cs" / "config.yaml").is_file()
    return stats, tmp_path / "cs"


SHIPPED_TEMPLATE = (REPO / "data" / "synthetic" / "construction_template.txt").read_text()


def test_coldstart_stage_rule_constructor(tmp_path):
    stats, out = run_shipped(tmp_path, "--set", "coldstart.constructor=rule")
    gold = gold_by_problem(REPO / "data" / "synthetic" / "train.jsonl")
    sft, ift = check_rows(out, stats, gold, SHIPPED_TEMPLATE)
    # The rule reads every wrong answer of the task; what it constructs is right by design.
    assert stats["pairs"] > 0 and stats["verified"] == stats["parsed"] == stats["constructed"] > 0
    # Two wrong answers can share the part before their mistake and so give the same reconstruction: one SFT row
    # (the duplicate counted), two IFT rows (their prompts differ).
    assert 0 < len(sft) <= len(ift) and len(sft) + stats["duplicates"] == stats["verified"]


def test_coldstart_stage_model_constructor(tmp_path):
    """The checkpoint constructs (greedy), loaded a second time through coldstart.constructor_path."""
    stats, out = run_shipped(tmp_path, "--set", "coldstart.constructor=model",
                             "--set", "coldstart.constructor_path=checkpoints/miniature-coldstart",
                             "--set", "tapo.temperature=0", "--set", "tapo.max_new_tokens=160")
    gold = gold_by_problem(REPO / "data" / "synthetic" / "train.jsonl")
    check_rows(out, stats, gold, SHIPPED_TEMPLATE)
    # A model answers every request, and the recording pass saw the same pairs as the reading pass.
    assert stats["pairs"] > 0 and stats["constructed"] == stats["pairs"] - stats["too_long"]
    assert stats["parsed"] > 0


class ScriptedPolicy:
    """Question i answers right in the first ``i % 5`` of its 4 samples, wrong (an arithmetic slip) in
    the rest, each of another error kind. The n-th construction request gets nonsense (n % 4 == 1), a construction whose answer is
    off (n % 4 == 2) or the rule's construction; every request is recorded with its outcome."""

    def __init__(self, rows: list[dict], template: str):
        self.rows, self.template = rows, template
        self.outcomes: dict[tuple[str, str], str] = {}  # (problem, construction output) -> outcome

    def answer(self, i: int, k: int) -> str:
        row = self.rows[i]
        # One error kind per sample: the wrong answers of a question differ (identical ones would share a pair).
        return row["solution"] if k < i % 5 else corrupt(row["solution"], random.Random(f"{i}/{k}"),
                                                         ERROR_KINDS[k]).text

    def __call__(self, prompt: str, k: int) -> str:
        for i, row in enumerate(self.rows):
            for w in range(i % 5, 4):
                wrong = self.answer(i, w)
                if render_construction_prompt(row["problem"], wrong, row["solution"], self.template) in prompt:
                    return self._construct(row["problem"], wrong)
        for i, row in enumerate(self.rows):
            if row["problem"] in prompt:
                return self.answer(i, k)
        raise AssertionError(f"unexpected prompt {prompt!r}")

    def _construct(self, problem: str, wrong: str) -> str:
        n = len(self.outcomes) + 1
        good = construct(problem, wrong)
        assert good is not None
        output, outcome = {1: ("no tags here", "garbage"), 2: (good.replace("\\boxed{", "\\boxed{9"), "wrong")}.get(
            n % 4, (good, "good"))
        self.outcomes[(problem, output)] = outcome
        return output


def test_coldstart_stage_model_constructor_scripted(tmp_path, monkeypatch, capsys):
    """Through ``main``: the tiny model's engine, a scripted policy in place of its sampling, the built-in
    template; exact counts, and exactly the verified constructions in the files."""
    rows = generate_dataset(10, seed=4, steps=(2, 3))
    write_jsonl(rows, tmp_path / "train.jsonl")
    policy = ScriptedPolicy(rows, DEFAULT_CONSTRUCTION_TEMPLATE)
    monkeypatch.setattr(runtime, "make_rollout",
                        lambda cfg, engine, tok: ScriptedRollout(tok, policy, tok.eos_token_id, tok.pad_token_id))
    out = tmp_path / "data" / "coldstart"  # not there yet: the stage creates it
    code = main(["--config", str(REPO / "configs" / "tiny.yaml"), "--set", "stage=coldstart", "--set", "name=cs",
                 "--set", f"output_dir={tmp_path}", "--set", f"data.train_files=[{tmp_path / 'train.jsonl'}]",
                 "--set", "data.prompt_template={problem}", "--set", "data.max_prompt_tokens=256",
                 "--set", "rollout.max_new_tokens=200", "--set", "tapo.max_new_tokens=400",
                 "--set", "coldstart.samples=4", "--set", "coldstart.m_max=2", "--set", "coldstart.constructor=model",
                 "--set", f"coldstart.output_dir={out}", "--set", "reward.num_workers=1", "--set", "torch_threads=1"])
    stdout = capsys.readouterr().out
    assert code == 0
    stats = parse_stats(stdout)
    outcomes = list(policy.outcomes.values())
    # Questions with 1-3 right of 4 are candidates (i % 5 in 1..3): 6 of 10, m_max=2 pairs each,
    # bounded by the wrong answers (3, 2, 1).
    assert stats["questions"] == 10 and stats["responses"] == 40 and stats["candidates"] == 6
    assert stats["pairs"] == len(outcomes) == 2 * (2 + 2 + 1) and stats["too_long"] == 0
    assert stats["constructed"] == len(outcomes)
    assert stats["parsed"] == len(outcomes) - outcomes.count("garbage")
    assert stats["verified"] == stats["kept_sft"] == stats["kept_ift"] == outcomes.count("good") > 0
    sft, ift = check_rows(out, stats, {r["problem"]: str(r["answer"]) for r in rows}, DEFAULT_CONSTRUCTION_TEMPLATE)
    good = {(p, parse_construction(o).reconstruction) for (p, o), outcome in policy.outcomes.items()
            if outcome == "good"}
    assert {(row["prompt"], row["response"]) for row in sft} == good
    assert {(next(p for p, _ in good if p in row["prompt"]), parse_construction(row["response"]).reconstruction)
            for row in ift} == good
    assert "--- example 1" in stdout and f"wrote {out / 'coldstart_sft.jsonl'}" in stdout
