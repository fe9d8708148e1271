"""The synthetic oracle constructor (``tapo.constructor: synthetic_oracle``): the rule constructor's
output with its correction spoiled with probability 1 - p, seeded, through TAPO's one code path."""

import random
import re
from pathlib import Path

import pytest
import torch

from tapo_ds.config import ConfigError, load_config
from tapo_ds.preflight import check_registry_names
from tapo_ds.reward import last_boxed
from tapo_ds.synthetic.errors import ERROR_KINDS, corrupt, random_wrong_solution
from tapo_ds.synthetic.oracle import oracle_construction
from tapo_ds.synthetic.task import apply, format_solution, generate_problems, parse_problem
from tapo_ds.trajectory import parse_construction, prefix_fidelity
from tapo_ds.trajectory.backends import BackendContext, ConstructionJob, backend_names, build_backend

REPO = Path(__file__).resolve().parent.parent


def _no_generate(prompts):
    raise AssertionError("the oracle must not call the policy")


def make_job(n, seed=0, step=1, rank=0):
    """n (question, rule-injected wrong answer, gold answer) requests of the synthetic task."""
    rng = random.Random(seed)
    problems = generate_problems(n, seed, steps=(2, 5), operators="+-*/")
    wrong = [random_wrong_solution(p, rng).text for p in problems]
    right = [format_solution(p.steps(), p.answer) for p in problems]
    job = ConstructionJob(questions=[p.text for p in problems], wrong=wrong, right=right,
                          prompt_ids=[[] for _ in problems], step=step, rank=rank)
    return job, [p.answer for p in problems]


def oracle(p, construction="micro", seed=1):
    return build_backend("synthetic_oracle", BackendContext(generate=_no_generate, construction=construction,
                                                            seed=seed, oracle_accuracy=p))


def scores(outputs, job, answers):
    """(parsed fraction, correct fraction of parsed, mean prefix fidelity of parsed)."""
    parsed = [(parse_construction(o), w, a) for o, w, a in zip(outputs, job.wrong, answers)]
    ok = [(c, w, a) for c, w, a in parsed if c is not None]
    correct = [last_boxed(c.reconstruction) == str(a) for c, _, a in ok]
    fidelity = [prefix_fidelity(c.reconstruction, w) for c, w, _ in ok]
    return len(ok) / len(parsed), sum(correct) / len(ok), sum(fidelity) / len(ok)


def test_registered_next_to_the_policy():
    assert {"policy", "synthetic_oracle"} <= set(backend_names())


@pytest.mark.parametrize("construction", ["micro", "full"])
def test_p1_always_right_p0_never(construction):
    job, answers = make_job(120)
    parsed, acc, fidelity = scores(oracle(1.0, construction)(job), job, answers)
    assert parsed == 1.0 and acc == 1.0
    if construction == "micro":
        assert fidelity == pytest.approx(1.0)
    parsed, acc, fidelity = scores(oracle(0.0, construction)(job), job, answers)
    assert parsed == 1.0 and acc == 0.0
    if construction == "micro":
        assert fidelity == pytest.approx(1.0)  # the prefix and the reflection point stay right


def test_p60_in_between_and_deterministic_per_seed():
    job, answers = make_job(300)
    first = oracle(0.6)(job)
    assert oracle(0.6)(job) == first  # same seed, rank and step: the same constructions
    _, acc, _ = scores(first, job, answers)
    assert 0.5 < acc < 0.7
    assert oracle(0.6, seed=2)(job) != first
    other_step = ConstructionJob(**{**job.__dict__, "step": 2})
    assert oracle(0.6)(other_step) != first


def test_a_request_is_spoiled_whatever_the_others_are():
    job, _ = make_job(40)
    full = oracle(0.6)(job)
    head = ConstructionJob(**{**job.__dict__, **{k: getattr(job, k)[:10] for k in
                                                  ("questions", "wrong", "right", "prompt_ids")}})
    assert oracle(0.6)(head) == full[:10]


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_spoiled_correction_slips_after_the_reflection(kind):
    problem = parse_problem("From 7: +5, *3, -4, +6.")
    rng = random.Random(3)
    for _ in range(10):
        wrong = corrupt(problem, rng, kind).text
        right_text = parse_construction(oracle_construction(problem.text, wrong, mode="micro", spoil=False,
                                                            rng=random.Random(0))).reconstruction
        spoiled = parse_construction(oracle_construction(problem.text, wrong, mode="micro", spoil=True,
                                                         rng=random.Random(0))).reconstruction
        mark = right_text.index("Wait, let me double-check")
        assert spoiled[:mark] == right_text[:mark]  # same prefix, same reflection point
        assert last_boxed(spoiled) != str(problem.answer)
        # exactly one computation after the mark slips, and the chain carries on from the slipped value
        rows = [(int(a), op, int(b), int(r)) for a, op, b, r in
                re.findall(r"(-?\d+)([-+*/])(\d+)=(-?\d+)", spoiled[mark:])]
        assert sum(apply(a, op, b) != r for a, op, b, r in rows) == 1, spoiled
        assert all(nxt[0] == prev[3] for prev, nxt in zip(rows, rows[1:])), spoiled


def test_wrong_final_answer_and_extra_step():
    q = "From 7: +5, *3, -4."
    steps = "Step 1: 7+5=12\nStep 2: 12*3=36\nStep 3: 36-4=32\n"
    for wrong in (steps + "Final Answer: \\boxed{31}", steps + "Step 4: 32+1=33\nFinal Answer: \\boxed{33}"):
        for spoil, expect_right in ((False, True), (True, False)):
            c = parse_construction(oracle_construction(q, wrong, mode="micro", spoil=spoil, rng=random.Random(0)))
            assert (last_boxed(c.reconstruction) == "32") is expect_right
            assert prefix_fidelity(c.reconstruction, wrong) == pytest.approx(1.0)


def test_unreadable_pair_gives_an_unparsable_output():
    assert oracle_construction("From 7: +5.", "I do not know", mode="micro", spoil=False, rng=random.Random(0)) == ""
    assert parse_construction("") is None


def test_unknown_constructor_is_a_config_error():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["tapo.constructor=synthetic_orcale"])
    with pytest.raises(ConfigError, match=r"tapo\.constructor: unknown construction backend 'synthetic_orcale' "
                                          r"\(did you mean 'synthetic_oracle'\?\)"):
        check_registry_names(cfg)
    with pytest.raises(ConfigError, match="tapo.oracle_accuracy"):
        load_config(REPO / "configs" / "tiny.yaml", ["tapo.oracle_accuracy=1.5"])


# ----------------------------------------------------------------------------- a TAPO step


class SyntheticScript:
    """Question q: samples k < 3 write the gold solution, the rest a rule-injected wrong one."""

    def __init__(self):
        self.construction_calls = 0

    def __call__(self, prompt, k):
        if "Wrong:" in prompt:
            self.construction_calls += 1
            return "policy construction"
        problem = parse_problem(prompt)
        if k < 3:
            return format_solution(problem.steps(), problem.answer)
        return random_wrong_solution(problem, random.Random(f"{problem.text}:{k}")).text


@pytest.fixture(scope="module")
def grader():
    from tapo_ds.engine import init_distributed
    from tapo_ds.reward import GradingPool

    init_distributed()
    with GradingPool(num_workers=1, timeout=10) as pool:
        yield pool


def oracle_step(tmp_path, grader, p):
    from tapo_ds.data import EpochSampler, load_examples, prepare
    from tapo_ds.monitor import Monitor
    from tapo_ds.scripted import ScriptedRollout
    from tapo_ds.stages import make_rl_trainer, setup_engine

    overrides = ["algorithm.name=tapo", "tapo.constructor=synthetic_oracle", f"tapo.oracle_accuracy={p}",
                 "data.train_files=[data/synthetic/train.jsonl]", "data.prompt_template={problem}",
                 "tapo.template=data/synthetic/construction_template.txt", "rollout.questions_per_step=2",
                 "rollout.samples_per_question=8", "rollout.max_new_tokens=200", "algorithm.micro_batch_size=8",
                 "data.limit=8", "seed=3", f"output_dir={tmp_path}"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    torch.manual_seed(0)
    engine, info, tok, _ = setup_engine(cfg, 1, cfg.algorithm.micro_batch_size)
    ex = load_examples(cfg.data.train_files, "problem", "answer", limit=cfg.data.limit)
    train, _ = prepare(ex, tok, cfg.data.prompt_template, {}, 256)
    script = SyntheticScript()
    rollout = ScriptedRollout(tok, script, tok.eos_token_id, tok.pad_token_id)
    monitor = Monitor(tmp_path, enabled=False, tensorboard=False, progress_bar=False, total_steps=1)
    trainer = make_rl_trainer(cfg, engine=engine, info=info, tokenizer=tok, rollout=rollout, grader=grader,
                              monitor=monitor, train=train, sampler=EpochSampler(len(train), cfg.seed))
    return trainer.step(1), script, rollout


@pytest.mark.parametrize("p, acc", [(1.0, 1.0), (0.0, 0.0)])
def test_tapo_step_with_the_oracle(tmp_path, grader, p, acc):
    m, script, rollout = oracle_step(tmp_path, grader, p)
    assert m["tapo/pairs"] == 8 and m["tapo/parse_success"] == 1.0
    assert m["tapo/construction_acc"] == acc
    assert m["tapo/prefix_fidelity"] == pytest.approx(1.0)
    # the policy generated the rollout only: no construction prompt reached it
    assert script.construction_calls == 0 and rollout.calls == 1 and m["tapo/generated_tokens"] == 0
    assert m["actor/grad_norm"] > 0
