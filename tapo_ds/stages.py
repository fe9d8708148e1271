"""Stages (``stage:`` in the config): ask the runtime for their parts, then run.

With ``tapo_ds/runtime.py`` the one place that reads the whole config; everything they call gets
plain values.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from tapo_ds.algorithms import AdvantageParams, PolicyLossParams
from tapo_ds.config import Config, ConfigError
from tapo_ds.data import EpochSampler, encode, load_examples, prepare, render_chat
from tapo_ds.engine import all_reduce_
from tapo_ds.loop import LoopState, resume, resume_target, run_loop
from tapo_ds.runtime import (
    MonitorSpec,
    Runtime,
    build_reference,
    load_tokenizer,
    open_runtime,
    sampling_of,
    setup_engine,  # noqa: F401  (bench/tapo_overhead.py builds its engine from here)
    world_size,
)
from tapo_ds.trainer import RLSettings, RLTrainer
from tapo_ds.trajectory import OTS
from tapo_ds.update import LossSettings


def run_rl(cfg: Config, resume_arg: str | None) -> dict:
    if cfg.rollout.questions_per_step % world_size():
        raise ConfigError(f"rollout.questions_per_step: {cfg.rollout.questions_per_step} is not divisible by "
                          f"the {world_size()} ranks")
    where = resume_target(resume_arg, cfg.run_dir)
    d = cfg.data
    # Rows are validated before the model loads: a bad line fails in seconds, not after minutes.
    examples = load_examples(d.train_files, d.problem_field, d.answer_field, d.split, d.limit, d.solution_field)
    monitor = MonitorSpec(cfg.total_steps, cfg.name, append=resume_arg is not None)
    with open_runtime(cfg, train=True, rollout=True, grader=True, monitor=monitor) as rt:
        train, too_long = prepare(examples, rt.tokenizer, d.prompt_template, cfg.model.chat_template_kwargs,
                                  d.max_prompt_tokens)
        rt.monitor.message(f"{cfg.name}: {len(train)} training questions ({too_long} over the prompt budget "
                           f"dropped), {rt.info.world_size} rank(s), ZeRO stage {rt.info.zero_stage}, algorithm "
                           f"{cfg.algorithm.name}")
        sampler = EpochSampler(len(train), cfg.seed, d.shuffle)
        state = _resumed(rt, sampler, where)
        trainer = make_rl_trainer(cfg, engine=rt.engine, info=rt.info, tokenizer=rt.tokenizer, rollout=rt.rollout,
                                  grader=rt.grader, monitor=rt.monitor, train=train, sampler=sampler)
        trainer.evaluator = build_evaluator(cfg, rt)
        if trainer.evaluator is not None and cfg.evaluation.at_start and state.step == 0:
            start = trainer.evaluator.run(0).reduce(all_reduce_, rt.info.device)
            rt.monitor.scalars(start, 0)
            rt.monitor.message("evaluation before training: " + ", ".join(f"{k}={v:.3f}" for k, v in start.items()))
        return _loop(rt, trainer.step, state, cfg.total_steps,
                     {"reward": "rollout/reward_mean", "s/step": "timing/step"})


def make_rl_trainer(cfg: Config, *, engine, info, tokenizer, rollout, grader, monitor, train, sampler) -> RLTrainer:
    """The RL step's pieces from the config; the rollout engine and grader are passed in."""
    r, a, t = cfg.rollout, cfg.algorithm, cfg.tapo
    lam = t.lam if a.name == "tapo" else 0.0
    settings = RLSettings(
        questions_per_step=r.questions_per_step, samples_per_question=r.samples_per_question,
        sampling=sampling_of(r, r.samples_per_question), advantage=a.name,
        advantage_params=AdvantageParams(eps=a.adv_eps, decoupled=t.decoupled_advantages,
                                         equal_reward_groups=t.equal_reward_groups),
        loss=LossSettings(policy_loss=a.policy_loss, clip=PolicyLossParams(a.clip_low, a.clip_high),
                          agg_mode=a.loss_agg, part_scale=(1.0, lam), combination=t.loss_combination,
                          kl_coef=a.kl_coef, kl_estimator=a.kl_estimator),
        ppo_epochs=a.ppo_epochs, mini_batches=a.mini_batches, micro_batch_size=a.micro_batch_size,
        text_every=cfg.logging.text_every, text_samples=cfg.logging.text_samples, seed=cfg.seed,
        ots=OTS(t.ots_w_min, t.ots_w_max) if a.name == "tapo" and t.ots else None,
        overlong_window=cfg.reward.overlong_window, overlong_penalty=cfg.reward.overlong_penalty,
        mask_truncated=a.mask_truncated, dynamic_sampling=r.dynamic_sampling,
        dynamic_sampling_max_rounds=r.dynamic_sampling_max_rounds, constructions_in_rollout=t.in_rollout)
    constructor = None
    if a.name == "tapo":
        from tapo_ds.construct import Constructor

        constructor = Constructor.from_config(cfg, tokenizer=tokenizer, rollout=rollout, grader=grader, info=info,
                                              monitor=monitor)
    ref_engine = build_reference(cfg) if (a.kl_coef > 0 or a.log_kl_to_init) else None
    teacher = None
    if a.name == "opsd":
        from tapo_ds.opsd import OpsdSettings, Teacher, load_teacher_template

        o = cfg.opsd
        teacher = Teacher(OpsdSettings(privileged=o.privileged, template=load_teacher_template(o.template),
                                       chat_template_kwargs=cfg.model.chat_template_kwargs, beta=o.beta,
                                       temperature=o.temperature, teacher_top_k=o.teacher_top_k or None,
                                       pointwise_clip=o.pointwise_clip or None, chunk_tokens=o.chunk_tokens,
                                       agg_mode=a.loss_agg),
                          tokenizer, frozen=build_reference(cfg) if o.teacher == "frozen" else None)
    return RLTrainer(settings=settings, engine=engine, info=info, tokenizer=tokenizer, rollout=rollout,
                     grader=grader, monitor=monitor, train_data=train, sampler=sampler,
                     constructor=constructor, ref_engine=ref_engine, teacher=teacher)


def evaluates(cfg: Config) -> bool:
    e = cfg.evaluation
    return bool(e.files) and bool(e.every or e.at_start)


def build_evaluator(cfg: Config, rt: Runtime):
    if not evaluates(cfg):
        return None
    from tapo_ds.evaluation import EvalSettings, Evaluator

    e, d = cfg.evaluation, cfg.data
    sets = {}
    for name, src in e.files.items():
        examples = load_examples([src], d.problem_field, d.answer_field, d.split, e.limit)
        sets[name], _ = prepare(examples, rt.tokenizer, d.prompt_template, cfg.model.chat_template_kwargs,
                                d.max_prompt_tokens)
    settings = EvalSettings(every=e.every, sampling=sampling_of(e, e.samples), ks=tuple(e.ks),
                            batch_questions=e.batch_questions)
    return Evaluator(sets, settings, rollout=rt.rollout, grader=rt.grader, tokenizer=rt.tokenizer, info=rt.info)


def run_sft(cfg: Config, resume_arg: str | None) -> dict:
    """Cold-start SFT: steps = ceil(sft.epochs x rows / sft.batch_size), or fewer with sft.max_steps."""
    from tapo_ds.sft import SFTTrainer, load_sft_rows

    sc = cfg.sft
    if sc.batch_size % world_size():
        raise ConfigError(f"sft.batch_size: {sc.batch_size} is not divisible by the {world_size()} ranks")
    where = resume_target(resume_arg, cfg.run_dir)
    # The tokenizer is needed to count steps before the engine (and its LR schedule) exists.
    rows, too_long = load_sft_rows(sc.train_files, load_tokenizer(cfg), prompt_field=sc.prompt_field,
                                   response_field=sc.response_field,
                                   chat_template_kwargs=cfg.model.chat_template_kwargs,
                                   max_seq_tokens=sc.max_seq_tokens)
    schedule_steps = math.ceil(sc.epochs * len(rows) / sc.batch_size)
    total = min(schedule_steps, sc.max_steps) if sc.max_steps else schedule_steps
    monitor = MonitorSpec(total, f"{cfg.name} (sft)", append=resume_arg is not None)
    # Rollout and grader only for the optional held-out evaluation (evaluation.*).
    with open_runtime(cfg, train=True, total_steps=schedule_steps, rollout=evaluates(cfg), grader=evaluates(cfg),
                      monitor=monitor) as rt:
        rt.monitor.message(f"{cfg.name}: SFT on {len(rows)} rows ({too_long} over sft.max_seq_tokens dropped), "
                           f"{total} steps of {sc.batch_size}, {rt.info.world_size} rank(s), ZeRO stage "
                           f"{rt.info.zero_stage}")
        sampler = EpochSampler(len(rows), cfg.seed, True)
        state = _resumed(rt, sampler, where)
        trainer = SFTTrainer(engine=rt.engine, info=rt.info, rows=rows, sampler=sampler, batch_size=sc.batch_size,
                             micro_batch_size=cfg.algorithm.micro_batch_size, pad_id=rt.tokenizer.pad_token_id)
        evaluator = build_evaluator(cfg, rt)

        def step_fn(step: int) -> dict:
            metrics = trainer.step(step)
            if evaluator is not None and (evaluator.due(step) or step == total):
                metrics.update(evaluator.run(step))
            return metrics.reduce(all_reduce_, rt.info.device)

        return _loop(rt, step_fn, state, total, {"loss": "sft/loss"})


def _resumed(rt: Runtime, sampler, where) -> LoopState:
    state = LoopState(step=0, sampler=sampler)
    resume(rt.engine, state, where, rt.monitor)
    if rt.monitor.bar is not None:
        rt.monitor.bar.n = state.step
    return state


def _loop(rt: Runtime, step_fn, state: LoopState, total: int, bar_fields: dict[str, str]) -> dict:
    c = rt.cfg.checkpoint
    return run_loop(step_fn=step_fn, state=state, total_steps=total, engine=rt.engine, tokenizer=rt.tokenizer,
                    monitor=rt.monitor, run_dir=rt.run_dir, ckpt_every=c.every, keep_last=c.keep_last,
                    export_hf=c.export_hf, rank=rt.info.rank, bar_fields=bar_fields)


def run_prefilter(cfg: Config, resume_arg: str | None) -> dict:
    """Sample ``prefilter.samples`` answers per question with ``model.path``; keep those in [low, high]."""
    from tapo_ds.prefilter import PrefilterResult, count_correct, gather_counts, write_filtered

    if resume_arg:
        raise ConfigError("--resume: the prefilter stage has nothing to resume; run it again")
    d, p = cfg.data, cfg.prefilter
    with open_runtime(cfg, train=False, rollout=True, grader=True) as rt:
        rank, world = rt.info.rank, rt.info.world_size
        examples = load_examples(d.train_files, d.problem_field, d.answer_field, d.split, d.limit, d.solution_field)
        questions, too_long = prepare(examples, rt.tokenizer, d.prompt_template, cfg.model.chat_template_kwargs,
                                      d.max_prompt_tokens)
        local = count_correct(questions[rank::world], rollout=rt.rollout, grader=rt.grader, tokenizer=rt.tokenizer,
                              sampling=sampling_of(cfg.rollout, p.samples), batch_questions=p.batch_questions,
                              device=rt.info.device)
    result = PrefilterResult(gather_counts(local, rank, world), p.samples)
    keep = result.keep(p.low, p.high)
    out = Path(p.output) if p.output else rt.run_dir / "filtered.jsonl"
    if rank == 0:
        write_filtered(out, questions, result, keep, d.problem_field, d.answer_field, d.solution_field)
        print(result.render(p.low, p.high), flush=True)
        print(f"({too_long} questions over data.max_prompt_tokens skipped) wrote {out}", flush=True)
    return {"prefilter/kept": float(len(keep)), "prefilter/questions": float(len(result.correct)),
            "prefilter/pass_rate_mean": sum(result.correct) / max(1, len(result.correct) * p.samples)}


def run_coldstart(cfg: Config, resume_arg: str | None) -> dict:
    """Sample answers with model.path, construct, keep what verifies, write the two files (rank 0)."""
    from tapo_ds.coldstart import build_coldstart, format_examples, model_constructor, per_pair, pool_grader
    from tapo_ds.prefilter import sample_and_grade
    from tapo_ds.trajectory import load_template

    if resume_arg:
        raise ConfigError("--resume: the coldstart stage has nothing to resume; run it again")
    if world_size() != 1:
        raise ConfigError("stage: coldstart runs on one rank (launch without --num_gpus > 1)")
    c, d, t = cfg.coldstart, cfg.data, cfg.tapo
    # Rows and template are read before the model loads: a bad line fails in seconds, not after minutes.
    examples = load_examples(d.train_files, d.problem_field, d.answer_field, d.split, d.limit)
    template = load_template(t.template or t.construction)
    with open_runtime(cfg, train=False, rollout=True, grader=True) as rt, contextlib.ExitStack() as stack:
        tok, chat = rt.tokenizer, cfg.model.chat_template_kwargs
        questions, too_long = prepare(examples, tok, d.prompt_template, chat, d.max_prompt_tokens)
        texts, rewards = sample_and_grade(questions, rollout=rt.rollout, grader=rt.grader, tokenizer=tok,
                                          sampling=sampling_of(cfg.rollout, c.samples),
                                          batch_questions=c.batch_questions, device=rt.info.device)
        if c.constructor == "rule":
            from tapo_ds.synthetic.constructor import rule_constructor

            constructor = per_pair(rule_constructor(t.construction))
        else:
            writer = rt if not c.constructor_path else stack.enter_context(
                open_runtime(cfg, train=False, model_path=c.constructor_path, rollout=True, run_dir=False))
            constructor = model_constructor(rollout=writer.rollout, tokenizer=writer.tokenizer,
                                            sampling=sampling_of(t, 1), chat_template_kwargs=chat,
                                            device=rt.info.device)
        result = build_coldstart(
            [q.example.problem for q in questions], [q.example.answer for q in questions], texts, rewards,
            constructor, pool_grader(rt.grader), n_pos=c.n_pos, n_neg=c.n_neg, m_max=c.m_max, seed=cfg.seed,
            prompt_template=d.prompt_template, construction_template=template,
            count_tokens=lambda p: len(encode(tok, render_chat(tok, p, chat))), max_prompt_tokens=t.max_prompt_tokens,
            min_fidelity=c.min_fidelity or None, n_examples=c.examples)
    out = Path(c.output_dir) if c.output_dir else rt.run_dir
    paths = result.write(out)
    print(f"cold-start data from {len(questions)} questions x {c.samples} samples "
          f"({too_long} over data.max_prompt_tokens skipped): {result.stats.summary()}", flush=True)
    print(format_examples(result.examples), flush=True)
    print(f"wrote {', '.join(map(str, paths))}", flush=True)
    return result.stats.as_dict()


STAGES = {"rl": run_rl, "sft": run_sft, "prefilter": run_prefilter, "coldstart": run_coldstart}


def run_stage(cfg: Config, resume_arg: str | None) -> dict:
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    return STAGES[cfg.stage](cfg, resume_arg)
