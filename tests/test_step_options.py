"""OPSD's step, DAPO's options and the rollout engine choice on the real engine (mostly with a scripted
policy)."""

import json

import pytest
import torch
from test_tapo_step import REPO, Script, eval_arith, one_step, scripted_trainer

from tapo_ds.config import load_config
from tapo_ds.data import EpochSampler, load_examples, prepare
from tapo_ds.engine import init_distributed
from tapo_ds.monitor import Monitor
from tapo_ds.reward import GradingPool
from tapo_ds.stages import make_rl_trainer, setup_engine


@pytest.fixture(scope="module")
def grader():
    init_distributed()
    with GradingPool(num_workers=1, timeout=10) as pool:
        yield pool


def test_opsd_step_distills_from_the_group(tmp_path, grader):
    m, _, rollout = one_step(tmp_path, grader, ["algorithm.name=opsd", "opsd.privileged=group"], n_right=3)
    assert rollout.calls == 1  # no construction pass
    assert m["opsd/privileged_frac"] == 1.0 and m["opsd/reference_frac"] == 0.0
    assert m["opsd/jsd"] > 0 and m["opsd/teacher_student_kl"] > 0
    assert m["actor/grad_norm"] > 0 and torch.isfinite(torch.tensor(m["actor/pg_loss"]))
    assert not any(k.startswith(("adv/", "tapo/")) for k in m)  # no advantages, no constructions


def test_opsd_without_privileged_information_trains_nothing(tmp_path, grader):
    m, _, _ = one_step(tmp_path, grader, ["algorithm.name=opsd", "opsd.privileged=group"], n_right=0)
    assert m["opsd/privileged_frac"] == 0.0 and m["actor/grad_norm"] == 0.0


def test_opsd_reference_solution_and_frozen_teacher(tmp_path, grader):
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b), "worked": f"{a} + {b} = {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    data = tmp_path / "with_solutions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m, _, _ = one_step(tmp_path, grader, ["algorithm.name=opsd", "opsd.teacher=frozen", "opsd.chunk_tokens=3",
                                          f"data.train_files=[{data}]", "data.solution_field=worked"], n_right=0)
    # no sample is right, but every row carries its reference: all get a teacher
    assert m["opsd/privileged_frac"] == 1.0 and m["opsd/reference_frac"] == 1.0
    # the frozen teacher is the initial model: before the update it differs from the student only by its prompt
    assert m["opsd/jsd"] > 0 and m["actor/grad_norm"] > 0


SMALL_STEP = ["rollout.questions_per_step=2", "rollout.samples_per_question=4", "rollout.max_new_tokens=200",
              "algorithm.micro_batch_size=8", "data.limit=8", "seed=3"]


def _trainer(tmp_path, grader, overrides, script):
    trainer, rollout, _ = scripted_trainer(tmp_path, grader, overrides, script, base=SMALL_STEP, logs=False)
    return trainer, rollout


class OddRight(Script):
    """Questions whose first operand is odd: half right; even: all wrong (an uninformative group)."""

    def __call__(self, prompt, k):
        a = int(prompt.split("What is ")[1].split(" ")[0])
        self.n_right = 2 if a % 2 else 0
        return super().__call__(prompt, k)


def test_dynamic_sampling_fills_the_step_with_informative_groups(tmp_path, grader):
    trainer, rollout = _trainer(tmp_path, grader, ["rollout.dynamic_sampling=true",
                                                   "rollout.dynamic_sampling_max_rounds=6"], OddRight(0))
    m = trainer.step(1)
    assert m["rollout/informative_groups"] == 2  # B = 2, reached
    assert 1 <= m["rollout/dynamic_sampling_draws"] <= 6 and rollout.calls == 1 + m["rollout/dynamic_sampling_draws"]
    assert m["rollout/drawn_questions"] == 2 * rollout.calls
    assert m["adv/num_groups"] == 2  # only the kept groups train
    assert "timing/fill" in m


def test_dynamic_sampling_gives_up_after_its_cap(tmp_path, grader):
    trainer, rollout = _trainer(tmp_path, grader, ["rollout.dynamic_sampling=true",
                                                   "rollout.dynamic_sampling_max_rounds=2"], Script(0))
    m = trainer.step(1)
    assert m["rollout/dynamic_sampling_draws"] == 2 and rollout.calls == 3
    assert m["rollout/informative_groups"] == 0 and m["actor/grad_norm"] == 0.0


def test_overlong_penalty_and_masked_truncation(tmp_path, grader):
    # every response is cut at 6 tokens: reward = correctness - 1 (the whole window is used)
    trainer, _ = _trainer(tmp_path, grader, ["rollout.max_new_tokens=6", "reward.overlong_window=6",
                                             "algorithm.mask_truncated=true"], Script(2))
    m = trainer.step(1)
    assert m["rollout/truncated_rate"] == 1.0
    assert m["rollout/reward_mean"] == pytest.approx(m["rollout/acc"] - 1.0)
    assert m["actor/grad_norm"] == 0.0  # every response masked out of the loss
    trainer, _ = _trainer(tmp_path / "b", grader, ["reward.overlong_window=199"], Script(2))
    m = trainer.step(1)
    assert m["rollout/reward_mean"] < m["rollout/acc"] and m["actor/grad_norm"] > 0


def test_rollout_engine_hybrid_engine_trains(tmp_path, grader):
    """``rollout.engine: hybrid_engine``: DeepSpeed's HybridEngineRollout generates the step (HF generate on
    the ZeRO-3 module here: the hybrid engine has no kernels for this model on CPU)."""
    from deepspeed.runtime.rollout import HybridEngineRollout

    from tapo_ds.rollout import TapoRollout
    from tapo_ds.runtime import make_rollout

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["rollout.engine=hybrid_engine", "rollout.questions_per_step=2",
                                                       "rollout.samples_per_question=2", "rollout.max_new_tokens=6",
                                                       "data.limit=4", f"output_dir={tmp_path}"])
    torch.manual_seed(0)
    engine, info, tok, _ = setup_engine(cfg, 1, cfg.algorithm.micro_batch_size)
    assert isinstance(make_rollout(load_config(REPO / "configs" / "tiny.yaml"), engine, tok), TapoRollout)
    rollout = make_rollout(cfg, engine, tok)
    assert isinstance(rollout, HybridEngineRollout)
    ex = load_examples(cfg.data.train_files, "problem", "answer", limit=cfg.data.limit)
    train, _ = prepare(ex, tok, cfg.data.prompt_template, {}, 256)
    monitor = Monitor(tmp_path, enabled=False, tensorboard=False, progress_bar=False, total_steps=1)
    trainer = make_rl_trainer(cfg, engine=engine, info=info, tokenizer=tok, rollout=rollout, grader=grader,
                              monitor=monitor, train=train, sampler=EpochSampler(len(train), cfg.seed))
    m = trainer.step(1)
    assert 1 <= m["rollout/response_len_max"] <= 6 and m["timing/rollout"] > 0
    assert torch.isfinite(torch.tensor(m["actor/pg_loss"]))


def test_eval_arith_helper_is_shared():
    assert eval_arith(2, "*", 3) == 6


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_opsd_step_is_invariant_to_the_micro_batch_split(tmp_path, grader, agg):
    runs = [one_step(tmp_path / str(mb), grader, ["algorithm.name=opsd", "opsd.privileged=group",
                                                 f"algorithm.loss_agg={agg}", f"algorithm.micro_batch_size={mb}"],
                     n_right=3)[0] for mb in (3, 16)]
    for key in ("actor/pg_loss", "actor/grad_norm", "opsd/jsd", "opsd/teacher_student_kl"):
        assert runs[0][key] == pytest.approx(runs[1][key], rel=1e-4), key


def test_opsd_with_the_student_prompt_as_teacher_prompt_is_zero(tmp_path):
    """Alignment check: a teacher shown exactly the student's prompt is the student, so the divergence
    and its gradient vanish, whatever the lengths in the micro-batch."""
    from tapo_ds.batch import Sample
    from tapo_ds.opsd import DEFAULT_TEACHER_TEMPLATE, OpsdSettings, Teacher

    init_distributed()
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"output_dir={tmp_path}", "algorithm.micro_batch_size=3"])
    torch.manual_seed(0)
    engine, info, tok, _ = setup_engine(cfg, 1, 3)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(prompt_ids=torch.randint(5, 100, (p,), generator=g).tolist(),
                      response_ids=torch.randint(5, 100, (r,), generator=g).tolist(), group_id=str(i), reward=0.0)
               for i, (p, r) in enumerate([(4, 7), (9, 2), (6, 11), (3, 5), (12, 1)])]
    settings = OpsdSettings(privileged="group", template=DEFAULT_TEACHER_TEMPLATE, chat_template_kwargs={}, beta=0.5,
                            temperature=1.0, teacher_top_k=None, pointwise_clip=None, chunk_tokens=4,
                            agg_mode="seq-mean-token-mean")
    m = Teacher(settings, tok).update(engine, samples, [s.prompt_ids for s in samples], micro_batch_size=3,
                                      pad_id=tok.pad_token_id, world_size=1).reduce()
    assert m["opsd/jsd"] == pytest.approx(0.0, abs=1e-6) and m["opsd/teacher_student_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["actor/grad_norm"] == pytest.approx(0.0, abs=1e-6)


def test_a_loaded_policy_trains_in_train_mode_with_gradient_checkpointing(tmp_path):
    """from_pretrained returns eval mode, where HF silently skips gradient checkpointing: the policy engine
    must come back in train mode, and checkpointing must then be active in its forward."""
    init_distributed()
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.path=checkpoints/miniature-coldstart",
                                                       "model.gradient_checkpointing=true", f"output_dir={tmp_path}"])
    engine, _, _, _ = setup_engine(cfg, 1, 2)
    assert engine.module.training and engine.module.model.gradient_checkpointing
    calls = []
    layer = engine.module.model.layers[0]
    original = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or original(*a, **k)
    ids = torch.tensor([[5, 6, 7, 8]])
    engine(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.sum().backward()
    assert calls, "gradient checkpointing was not used in the training forward"
