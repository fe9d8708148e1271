"""Stages (``stage:`` in the config): build the pieces from the config and run the loop.

This is the one place that reads the whole config; everything it calls gets plain values.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from deepspeed.runtime.rollout.base import SamplingConfig

from tapo_ds import engine as eng
from tapo_ds import modeling
from tapo_ds.algorithms import AdvantageParams, PolicyLossParams
from tapo_ds.config import Config, ConfigError, save_config
from tapo_ds.data import EpochSampler, encode, load_examples, prepare, render_chat
from tapo_ds.loop import LoopState, resume, resume_target, run_loop
from tapo_ds.monitor import Monitor
from tapo_ds.reward import GradingPool
from tapo_ds.rollout import TapoRollout
from tapo_ds.trainer import RLSettings, RLTrainer
from tapo_ds.update import LossSettings

log = logging.getLogger(__name__)


def build_model(cfg: Config, ds_config: dict):
    """Policy model and tokenizer; real checkpoints load partitioned under ZeRO-3."""
    if cfg.model.path == "tiny":
        return modeling.build_tiny_model_and_tokenizer(seed=cfg.seed, **cfg.model.tiny_overrides)
    tokenizer = modeling.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    with eng.zero_init_context(ds_config) as _keep_alive:  # noqa: F841 (must outlive from_pretrained)
        model = modeling.load_model(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code)
    return model, tokenizer


def setup_engine(cfg: Config, world_size: int, micro_batch_size: int, total_steps: int | None = None):
    ds_config = eng.load_ds_config(cfg.deepspeed.config, micro_batch_size=micro_batch_size,
                                   world_size=world_size, grad_clip=cfg.optimizer.grad_clip,
                                   hybrid_engine=cfg.deepspeed.hybrid_engine, dtype=cfg.model.dtype)
    model, tokenizer = build_model(cfg, ds_config)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    o = cfg.optimizer
    lr_fn = eng.lr_lambda(o.schedule, o.warmup_steps, total_steps or cfg.total_steps, o.decay_start, o.min_lr_ratio)
    engine, info = eng.build_engine(model, ds_config, lr=o.lr, betas=o.betas, eps=o.eps,
                                    weight_decay=o.weight_decay, lr_fn=lr_fn,
                                    model_type=model.config.model_type)
    return engine, info, tokenizer, ds_config


def _prepare_run_dir(cfg: Config, rank: int) -> Path:
    run_dir = cfg.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


def run_rl(cfg: Config, resume_arg: str | None) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.rollout.questions_per_step % world:
        raise ConfigError(f"rollout.questions_per_step: {cfg.rollout.questions_per_step} is not divisible by "
                         f"the {world} ranks")
    where = resume_target(resume_arg, cfg.run_dir)
    d = cfg.data
    # Rows are validated before the model loads: a bad line fails in seconds, not after minutes.
    examples = load_examples(d.train_files, d.problem_field, d.answer_field, d.split, d.limit)
    engine, info, tokenizer, _ = setup_engine(cfg, world, cfg.algorithm.micro_batch_size)
    run_dir = _prepare_run_dir(cfg, info.rank)
    train, too_long = prepare(examples, tokenizer, d.prompt_template, cfg.model.chat_template_kwargs,
                              d.max_prompt_tokens)
    monitor = Monitor(run_dir, enabled=info.rank == 0, tensorboard=cfg.logging.tensorboard,
                      progress_bar=cfg.logging.progress_bar, total_steps=cfg.total_steps, desc=cfg.name,
                      append=resume_arg is not None)
    monitor.message(f"{cfg.name}: {len(train)} training questions ({too_long} over the prompt budget dropped), "
                    f"{info.world_size} rank(s), ZeRO stage {info.zero_stage}, algorithm {cfg.algorithm.name}")
    sampler = EpochSampler(len(train), cfg.seed, d.shuffle)
    state = LoopState(step=0, sampler=sampler)
    resume(engine, state, where, monitor)
    if monitor.bar is not None:
        monitor.bar.n = state.step

    rollout = TapoRollout(engine, tokenizer, modeling.stop_token_ids(tokenizer, engine.module.config),
                          tokenizer.pad_token_id, seed=cfg.seed, gather=cfg.rollout.gather,
                          module_factory=modeling.model_factory(engine.module.config))
    with GradingPool(num_workers=cfg.reward.num_workers, timeout=cfg.reward.timeout,
                     memory_mb=cfg.reward.memory_mb) as grader:
        trainer = make_rl_trainer(cfg, engine=engine, info=info, tokenizer=tokenizer, rollout=rollout,
                                  grader=grader, monitor=monitor, train=train, sampler=sampler)
        trainer.evaluator = build_evaluator(cfg, tokenizer, rollout, grader, info)
        if trainer.evaluator is not None and cfg.evaluation.at_start and state.step == 0:
            start = trainer.evaluator.run(0)
            monitor.scalars(start, 0)
            monitor.message("evaluation before training: " + ", ".join(f"{k}={v:.3f}" for k, v in start.items()))
        try:
            metrics = run_loop(step_fn=trainer.step, state=state, total_steps=cfg.total_steps, engine=engine,
                               tokenizer=tokenizer, monitor=monitor, run_dir=run_dir,
                               ckpt_every=cfg.checkpoint.every, keep_last=cfg.checkpoint.keep_last,
                               export_hf=cfg.checkpoint.export_hf, rank=info.rank,
                               bar_fields={"reward": "rollout/reward_mean", "s/step": "timing/step"})
        finally:
            monitor.close()
    return metrics


def make_rl_trainer(cfg: Config, *, engine, info, tokenizer, rollout, grader, monitor, train, sampler) -> RLTrainer:
    """The RL step's pieces from the config; the rollout engine and grader are passed in."""
    r, a = cfg.rollout, cfg.algorithm
    sampling = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, n_samples_per_prompt=r.samples_per_question)
    lam = cfg.tapo.lam if a.name == "tapo" else 0.0
    settings = RLSettings(
        questions_per_step=r.questions_per_step, samples_per_question=r.samples_per_question,
        sampling=sampling, advantage=a.name,
        advantage_params=AdvantageParams(eps=a.adv_eps, decoupled=cfg.tapo.decoupled_advantages,
                                         equal_reward_groups=cfg.tapo.equal_reward_groups),
        loss=LossSettings(policy_loss=a.policy_loss, clip=PolicyLossParams(a.clip_low, a.clip_high),
                          agg_mode=a.loss_agg, part_scale=(1.0, lam), combination=cfg.tapo.loss_combination,
                          kl_coef=a.kl_coef, kl_estimator=a.kl_estimator),
        ppo_epochs=a.ppo_epochs, mini_batches=a.mini_batches, micro_batch_size=a.micro_batch_size,
        text_every=cfg.logging.text_every, text_samples=cfg.logging.text_samples, seed=cfg.seed)
    constructor = None
    if a.name == "tapo":
        constructor = build_constructor(cfg, tokenizer, rollout, info, monitor)
        constructor.grader = grader
    ref_engine = build_reference(cfg, info) if (a.kl_coef > 0 or a.log_kl_to_init) else None
    return RLTrainer(settings=settings, engine=engine, info=info, tokenizer=tokenizer, rollout=rollout,
                     grader=grader, monitor=monitor, train_data=train, sampler=sampler,
                     constructor=constructor, ref_engine=ref_engine)


def build_evaluator(cfg: Config, tokenizer, rollout, grader, info):
    e, d = cfg.evaluation, cfg.data
    if not e.files or not (e.every or e.at_start):
        return None
    from tapo_ds.evaluation import EvalSettings, Evaluator

    sets = {}
    for name, src in e.files.items():
        examples = load_examples([src], d.problem_field, d.answer_field, d.split, e.limit)
        sets[name], _ = prepare(examples, tokenizer, d.prompt_template, cfg.model.chat_template_kwargs,
                                d.max_prompt_tokens)
    sampling = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                              n_samples_per_prompt=e.samples)
    return Evaluator(sets, EvalSettings(every=e.every, sampling=sampling, ks=tuple(e.ks),
                                        batch_questions=e.batch_questions),
                     rollout=rollout, grader=grader, tokenizer=tokenizer, info=info)


def build_constructor(cfg: Config, tokenizer, rollout, info, monitor):
    from tapo_ds.construct import Constructor

    return Constructor.from_config(cfg, tokenizer, rollout, info, monitor)


def build_reference(cfg: Config, info):
    """A frozen copy of the initial policy for the KL term (same loading path, no optimizer)."""
    ds_config = eng.load_ds_config(cfg.deepspeed.config, micro_batch_size=cfg.algorithm.micro_batch_size,
                                   world_size=info.world_size, grad_clip=0.0, hybrid_engine=False,
                                   dtype=cfg.model.dtype)
    model, _ = build_model(cfg, ds_config)
    return eng.build_inference_engine(model, ds_config)


def run_sft(cfg: Config, resume_arg: str | None) -> dict:
    """Cold-start SFT: steps = ceil(sft.epochs x rows / sft.batch_size), or fewer with sft.max_steps."""
    import math

    from tapo_ds.sft import SFTTrainer, load_sft_rows

    world = int(os.environ.get("WORLD_SIZE", "1"))
    sc = cfg.sft
    if sc.batch_size % world:
        raise ConfigError(f"sft.batch_size: {sc.batch_size} is not divisible by the {world} ranks")
    where = resume_target(resume_arg, cfg.run_dir)
    # The tokenizer is needed to count steps before the engine (and its LR schedule) exists.
    tokenizer = modeling.build_tiny_tokenizer() if cfg.model.path == "tiny" else modeling.load_tokenizer(
        cfg.model.path, cfg.model.trust_remote_code)
    rows, too_long = load_sft_rows(sc.train_files, tokenizer, prompt_field=sc.prompt_field,
                                   response_field=sc.response_field,
                                   chat_template_kwargs=cfg.model.chat_template_kwargs,
                                   max_seq_tokens=sc.max_seq_tokens)
    schedule_steps = math.ceil(sc.epochs * len(rows) / sc.batch_size)
    total = min(schedule_steps, sc.max_steps) if sc.max_steps else schedule_steps
    engine, info, tokenizer, _ = setup_engine(cfg, world, cfg.algorithm.micro_batch_size,
                                              total_steps=schedule_steps)
    run_dir = _prepare_run_dir(cfg, info.rank)
    monitor = Monitor(run_dir, enabled=info.rank == 0, tensorboard=cfg.logging.tensorboard,
                      progress_bar=cfg.logging.progress_bar, total_steps=total, desc=f"{cfg.name} (sft)",
                      append=resume_arg is not None)
    monitor.message(f"{cfg.name}: SFT on {len(rows)} rows ({too_long} over sft.max_seq_tokens dropped), "
                    f"{total} steps of {sc.batch_size}, {info.world_size} rank(s), ZeRO stage {info.zero_stage}")
    sampler = EpochSampler(len(rows), cfg.seed, True)
    state = LoopState(step=0, sampler=sampler)
    resume(engine, state, where, monitor)
    if monitor.bar is not None:
        monitor.bar.n = state.step
    trainer = SFTTrainer(engine=engine, info=info, rows=rows, sampler=sampler, batch_size=sc.batch_size,
                         micro_batch_size=cfg.algorithm.micro_batch_size, pad_id=tokenizer.pad_token_id)
    with GradingPool(num_workers=cfg.reward.num_workers, timeout=cfg.reward.timeout,
                     memory_mb=cfg.reward.memory_mb) as grader:
        # Optional held-out evaluation (evaluation.*), e.g. to watch a cold start reach the RL band.
        rollout = TapoRollout(engine, tokenizer, modeling.stop_token_ids(tokenizer, engine.module.config),
                              tokenizer.pad_token_id, seed=cfg.seed, gather=cfg.rollout.gather,
                              module_factory=modeling.model_factory(engine.module.config))
        evaluator = build_evaluator(cfg, tokenizer, rollout, grader, info)

        def step_fn(step: int) -> dict:
            metrics = trainer.step(step)
            if evaluator is not None and (evaluator.due(step) or step == total):
                metrics.update(evaluator.run(step))
            return metrics

        try:
            return run_loop(step_fn=step_fn, state=state, total_steps=total, engine=engine, tokenizer=tokenizer,
                            monitor=monitor, run_dir=run_dir, ckpt_every=cfg.checkpoint.every,
                            keep_last=cfg.checkpoint.keep_last, export_hf=cfg.checkpoint.export_hf,
                            rank=info.rank, bar_fields={"loss": "sft/loss"})
        finally:
            monitor.close()


def run_prefilter(cfg: Config, resume_arg: str | None) -> dict:
    """Sample ``prefilter.samples`` answers per question with ``model.path``; keep those in [low, high]."""
    from tapo_ds.prefilter import PrefilterResult, count_correct, gather_counts, write_filtered

    if resume_arg:
        raise ConfigError("--resume: the prefilter stage has nothing to resume; run it again")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine, tokenizer, rollout = _inference_engine(cfg, cfg.model.path)
    rank = torch.distributed.get_rank()
    run_dir = _prepare_run_dir(cfg, rank)
    d, p, r = cfg.data, cfg.prefilter, cfg.rollout
    examples = load_examples(d.train_files, d.problem_field, d.answer_field, d.split, d.limit)
    questions, too_long = prepare(examples, tokenizer, d.prompt_template, cfg.model.chat_template_kwargs,
                                  d.max_prompt_tokens)
    sampling = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, n_samples_per_prompt=p.samples)
    with GradingPool(num_workers=cfg.reward.num_workers, timeout=cfg.reward.timeout,
                     memory_mb=cfg.reward.memory_mb) as grader:
        local = count_correct(questions[rank::world], rollout=rollout, grader=grader, tokenizer=tokenizer,
                              sampling=sampling, batch_questions=p.batch_questions, device=engine.device)
    result = PrefilterResult(gather_counts(local, rank, world), p.samples)
    keep = result.keep(p.low, p.high)
    out = Path(p.output) if p.output else run_dir / "filtered.jsonl"
    if rank == 0:
        write_filtered(out, questions, result, keep, d.problem_field, d.answer_field)
        print(result.render(p.low, p.high), flush=True)
        print(f"({too_long} questions over data.max_prompt_tokens skipped) wrote {out}", flush=True)
    return {"prefilter/kept": float(len(keep)), "prefilter/questions": float(len(result.correct)),
            "prefilter/pass_rate_mean": sum(result.correct) / max(1, len(result.correct) * p.samples)}


def _inference_engine(cfg: Config, path: str):
    """A DeepSpeed engine without optimizer (ZeRO-3 partitioned loading for big models)."""
    import dataclasses

    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = eng.load_ds_config(cfg.deepspeed.config, micro_batch_size=1, world_size=world, grad_clip=0.0,
                                   hybrid_engine=False, dtype=cfg.model.dtype)
    model, tokenizer = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path)),
                                   ds_config)
    engine = eng.build_inference_engine(model, ds_config)
    rollout = TapoRollout(engine, tokenizer, modeling.stop_token_ids(tokenizer, engine.module.config),
                          tokenizer.pad_token_id, seed=cfg.seed, gather=cfg.rollout.gather,
                          module_factory=modeling.model_factory(engine.module.config))
    rollout.sync_weights(0)
    return engine, tokenizer, rollout


def run_coldstart(cfg: Config, resume_arg: str | None) -> dict:
    """Sample answers with model.path, construct, keep what verifies, write the two files (rank 0)."""
    from tapo_ds.coldstart import BatchedModelConstructor, build_with_model, build_with_rule
    from tapo_ds.prefilter import sample_and_grade
    from tapo_ds.synthetic.coldstart import format_examples
    from tapo_ds.trajectory import load_template

    if resume_arg:
        raise ConfigError("--resume: the coldstart stage has nothing to resume; run it again")
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConfigError("stage: coldstart runs on one rank (launch without --num_gpus > 1)")
    c, d, r, t = cfg.coldstart, cfg.data, cfg.rollout, cfg.tapo
    # Rows and template are read before the model loads: a bad line fails in seconds, not after minutes.
    examples = load_examples(d.train_files, d.problem_field, d.answer_field, d.split, d.limit)
    template = load_template(t.template or t.construction)
    engine, tokenizer, rollout = _inference_engine(cfg, cfg.model.path)
    run_dir = _prepare_run_dir(cfg, 0)
    questions, too_long = prepare(examples, tokenizer, d.prompt_template, cfg.model.chat_template_kwargs,
                                  d.max_prompt_tokens)
    sampling = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, n_samples_per_prompt=c.samples)
    kwargs = dict(n_pos=c.n_pos, n_neg=c.n_neg, m_max=c.m_max, seed=cfg.seed, prompt_template=d.prompt_template,
                  construction_template=template, min_fidelity=c.min_fidelity or None, n_examples=c.examples,
                  count_tokens=lambda p: len(encode(tokenizer, render_chat(tokenizer, p, cfg.model.chat_template_kwargs))),
                  max_prompt_tokens=t.max_prompt_tokens)
    with GradingPool(num_workers=cfg.reward.num_workers, timeout=cfg.reward.timeout,
                     memory_mb=cfg.reward.memory_mb) as grader:
        texts, rewards = sample_and_grade(questions, rollout=rollout, grader=grader, tokenizer=tokenizer,
                                          sampling=sampling, batch_questions=c.batch_questions, device=engine.device)
        common = dict(questions=[q.example.problem for q in questions], answers=[q.example.answer for q in questions],
                      responses=texts, rewards=rewards, grader_pool=grader, build_kwargs=kwargs)
        if c.constructor == "rule":
            from tapo_ds.synthetic.constructor import rule_constructor

            result = build_with_rule(rule=rule_constructor(t.construction), **common)
        else:
            c_rollout, c_tok = rollout, tokenizer
            if c.constructor_path:
                _, c_tok, c_rollout = _inference_engine(cfg, c.constructor_path)
            constructor = BatchedModelConstructor(
                rollout=c_rollout, tokenizer=c_tok, template=template, chat_template_kwargs=cfg.model.chat_template_kwargs,
                sampling=SamplingConfig(max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_p=t.top_p,
                                        n_samples_per_prompt=1), device=engine.device)
            result = build_with_model(constructor=constructor, **common)
    out = Path(c.output_dir) if c.output_dir else run_dir
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
