"""TAPO's step on the real engine with a scripted policy, so every branch fires."""

import re
from pathlib import Path

import pytest
import torch

from tapo_ds.config import load_config
from tapo_ds.data import EpochSampler, load_examples, prepare
from tapo_ds.engine import init_distributed
from tapo_ds.monitor import Monitor
from tapo_ds.reward import GradingPool
from tapo_ds.scripted import ScriptedRollout
from tapo_ds.stages import make_rl_trainer, setup_engine

REPO = Path(__file__).resolve().parent.parent
CONSTRUCTIONS = [
    # parses and verifies: a positive constructed sample
    "<analysis>Step 1 used the wrong operator.</analysis><reconstruction>Step 1: {wrong_line}\n"
    "Wait, let me double-check step 1. Final Answer: \\boxed{{{gold}}}</reconstruction>",
    "no tags at all",  # unparsable: dropped and counted
    # parses, wrong answer: kept as a negative (dropped with keep_failed_constructions=false)
    "<analysis>x</analysis><reconstruction>Step 1: {wrong_line}\nWait, let me double-check. "
    "Final Answer: \\boxed{{999}}</reconstruction>",
]


class Script:
    """Question q: samples k < n_right answer right, the rest wrong; constructions cycle the list."""

    def __init__(self, n_right):
        self.n_right, self.calls = n_right, 0

    def __call__(self, prompt, k):
        if "<reconstruction>" in prompt:  # a construction prompt
            text = CONSTRUCTIONS[self.calls % len(CONSTRUCTIONS)]
            self.calls += 1
            return text.format(wrong_line="a mistake", gold=self.gold_of(prompt))
        a, op, b = re.search(r"What is (-?\d+) ([-+*]) (-?\d+)\?", prompt).groups()
        gold = eval_arith(int(a), op, int(b))
        return f"Step 1: compute. \\boxed{{{gold if k < self.n_right else gold + 1}}}"

    @staticmethod
    def gold_of(prompt):
        a, op, b = re.search(r"What is (-?\d+) ([-+*]) (-?\d+)\?", prompt).groups()
        return eval_arith(int(a), op, int(b))


def eval_arith(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b}[op]


@pytest.fixture(scope="module")
def grader():
    init_distributed()
    with GradingPool(num_workers=1, timeout=10) as pool:
        yield pool


ONE_STEP = ["rollout.questions_per_step=2", "rollout.samples_per_question=8", "rollout.max_new_tokens=200",
            "algorithm.micro_batch_size=6", "tapo.max_new_tokens=400", "data.limit=8", "seed=3",
            "tapo.examples_every=1", "logging.text_every=1"]


def scripted_trainer(tmp_path, grader, overrides, script, base=ONE_STEP, logs=True):
    """The RL trainer of ``configs/tiny.yaml`` + ``base`` + ``overrides`` on the real engine, with ``script``
    answering every prompt; returns (trainer, rollout, monitor)."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", list(base) + [f"output_dir={tmp_path}"] + list(overrides))
    torch.manual_seed(0)
    engine, info, tok, _ = setup_engine(cfg, 1, cfg.algorithm.micro_batch_size)
    ex = load_examples(cfg.data.train_files, "problem", "answer", limit=cfg.data.limit,
                       solution_field=cfg.data.solution_field)
    train, _ = prepare(ex, tok, cfg.data.prompt_template, {}, 256)
    rollout = ScriptedRollout(tok, script, tok.eos_token_id, tok.pad_token_id)
    monitor = Monitor(tmp_path, enabled=logs, tensorboard=logs, progress_bar=False, total_steps=1)
    trainer = make_rl_trainer(cfg, engine=engine, info=info, tokenizer=tok, rollout=rollout, grader=grader,
                              monitor=monitor, train=train, sampler=EpochSampler(len(train), cfg.seed))
    return trainer, rollout, monitor


def one_step(tmp_path, grader, overrides, n_right):
    script = Script(n_right)
    trainer, rollout, monitor = scripted_trainer(tmp_path, grader, overrides, script)
    metrics = trainer.step(1)
    monitor.close()
    return metrics, script, rollout


def test_tapo_step_fires_every_branch(tmp_path, grader):
    m, script, rollout = one_step(tmp_path, grader, ["algorithm.name=tapo"], n_right=3)
    # 3 right / 5 wrong per question: both questions selected, m_max=4 pairs each
    assert m["tapo/selected_frac"] == 1.0 and m["tapo/pairs"] == 8
    assert script.calls == 8 and rollout.calls == 2  # the rollout, then all constructions in one call
    # cycle: ok, unparsable, wrong, ok, unparsable, wrong, ok, unparsable -> 5 parsed of 8
    assert m["tapo/parse_success"] == pytest.approx(5 / 8)
    assert m["tapo/construction_acc"] == pytest.approx(3 / 5)
    assert m["tapo/constructed_samples"] == 5 and m["tapo/dropped_failed"] == 0
    assert m["tapo/reflected_groups"] == 2
    assert 0.01 <= m["tapo/ots_weight_mean"] <= 10.0
    assert m["rollout/reflection_rate"] == 0.0  # the scripted answers never reflect; the constructions do
    assert torch.isfinite(torch.tensor(m["actor/pg_loss"])) and m["actor/grad_norm"] > 0
    assert "timing/construct" in m


def test_prefix_loss_mask_takes_the_copied_tokens_out_of_the_loss(tmp_path, grader):
    """Each construction re-types "Step 1: a mistake" before its reflection: logged as the prefix share; with
    ``tapo.prefix_loss=mask`` those tokens get no loss (and no push), the rest of the step is unchanged."""
    runs = {}
    for mode in ("train", "mask"):
        runs[mode] = one_step(tmp_path / mode, grader, ["algorithm.name=tapo", f"tapo.prefix_loss={mode}"], 3)[0]
    train, mask = runs["train"], runs["mask"]
    assert 0 < train["tapo/prefix_token_frac"] == mask["tapo/prefix_token_frac"] < 1
    assert 0.01 <= train["tapo/ots_weight_prefix_mean"] <= 10.0 and "tapo/prefix_push" in train
    assert "tapo/ots_weight_prefix_mean" not in mask and "tapo/prefix_push" not in mask
    assert mask["tapo/ots_weight_after_mean"] == pytest.approx(train["tapo/ots_weight_after_mean"], rel=1e-5)
    for key in ("rollout/reward_mean", "tapo/construction_acc", "tapo/constructed_tokens"):
        assert mask[key] == train[key], key
    assert mask["actor/pg_loss"] != train["actor/pg_loss"]


def test_negatives_dropped_under_switch(tmp_path, grader):
    m, _, _ = one_step(tmp_path, grader, ["algorithm.name=tapo", "tapo.keep_failed_constructions=false"], 3)
    assert m["tapo/constructed_samples"] == 3 and m["tapo/dropped_failed"] == 2


def test_grpo_path_unchanged_when_construction_never_fires(tmp_path, grader):
    """No candidates: TAPO's step is GRPO's, bit for bit."""
    runs = []
    for algo in ("grpo", "tapo"):
        # 1 right / 7 wrong is below n_pos=2: nothing is selected
        runs.append(one_step(tmp_path / algo, grader, [f"algorithm.name={algo}"], n_right=1)[0])
    mg, mt = runs
    assert mt["tapo/pairs"] == 0
    for key in ("actor/pg_loss", "actor/grad_norm", "rollout/reward_mean"):
        assert mg[key] == mt[key], key


def test_several_updates_per_rollout_with_kl(tmp_path, grader):
    """ppo_epochs x mini_batches > 1: old log-probs and OTS weights come from a separate pre-update
    pass; the KL to the frozen initial policy is logged and starts at zero."""
    m, _, _ = one_step(tmp_path, grader, ["algorithm.name=tapo", "algorithm.ppo_epochs=2",
                                          "algorithm.mini_batches=2", "algorithm.kl_coef=0.1",
                                          "algorithm.kl_estimator=k3"], n_right=3)
    assert 0.01 <= m["tapo/ots_weight_mean"] <= 10.0
    assert m["actor/kl"] >= 0.0 and m["actor/kl"] < 1e-2  # k3 >= 0, and the policy barely moved
    assert m["actor/grad_norm"] > 0 and "actor/entropy" in m


class PerQuestionScript(Script):
    """Constructions cycle per question (not per call), so their texts do not depend on the order in
    which questions are constructed."""

    def __init__(self, n_right):
        super().__init__(n_right)
        self.per_question = {}

    def __call__(self, prompt, k):
        if "<reconstruction>" not in prompt:
            return super().__call__(prompt, k)
        self.calls += 1
        gold = self.gold_of(prompt)
        i = self.per_question[gold] = self.per_question.get(gold, -1) + 1
        return CONSTRUCTIONS[i % len(CONSTRUCTIONS)].format(wrong_line="a mistake", gold=gold)


def test_constructions_inside_the_rollout_change_only_the_schedule(tmp_path, grader):
    """tapo.in_rollout: questions graded and constructed as they complete (here last to first) give the
    step of the phases one after another: same pairs, constructions, rewards, loss and gradient."""
    runs = {}
    for fused in (False, True):
        script = PerQuestionScript(3)
        trainer, rollout, monitor = scripted_trainer(tmp_path / str(fused), grader,
                                                     ["algorithm.name=tapo", f"tapo.in_rollout={fused}"], script)
        assert trainer.constructs_in_rollout == fused
        runs[fused] = trainer.step(1)
        monitor.close()
        assert script.calls == 8
    phased, fused = runs[False], runs[True]
    assert fused["tapo/pairs"] == 8 and fused["tapo/constructed_samples"] == 6
    assert "timing/grade_wait" in fused and "timing/reward" not in fused
    for key in sorted(phased):
        if not key.startswith(("timing/", "perf/")):
            assert fused[key] == phased[key], key
