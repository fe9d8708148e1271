"""The RL step as named phases — rollout -> reward -> construct -> advantages -> update — and the loop.

Each phase is timed and returns its outputs plus its rank's :class:`~tapo_ds.metrics.StepMetrics`,
reduced over ranks once at the end of the step. ``construct`` is TAPO's phase; with
``algorithm.name: grpo`` it is skipped and the rest of the code path is the same.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from deepspeed.runtime.rollout.base import SamplingConfig

from tapo_ds.algorithms import AdvantageParams, get_advantage_estimator
from tapo_ds.batch import Sample, split_mini_batches
from tapo_ds.data import PromptedExample, shard
from tapo_ds.engine import all_reduce_
from tapo_ds.generation import generate
from tapo_ds.metrics import StepMetrics
from tapo_ds.trajectory import OTS
from tapo_ds.update import LossSettings, optimizer_step, per_token_stats, update_metrics

log = logging.getLogger(__name__)


@contextlib.contextmanager
def timed(name: str, metrics: StepMetrics):
    start = time.perf_counter()
    yield
    metrics.local(f"timing/{name}", time.perf_counter() - start)


@dataclass
class RolloutOut:
    questions: list[PromptedExample]
    samples: list[Sample]  # one per response, group_id = question uid
    texts: list[str]
    truncated: list[bool]
    metrics: StepMetrics = field(default_factory=StepMetrics)


@dataclass
class RLSettings:
    """Everything the step needs from the config, as plain values."""
    questions_per_step: int
    samples_per_question: int
    sampling: SamplingConfig
    advantage: str
    advantage_params: AdvantageParams
    loss: LossSettings
    ppo_epochs: int
    mini_batches: int
    micro_batch_size: int
    text_every: int
    text_samples: int
    seed: int
    ots: OTS | None = None  # TAPO's token weights of constructed samples; None: every token weighs 1


class RLTrainer:
    def __init__(self, *, settings: RLSettings, engine, info, tokenizer, rollout, grader, monitor,
                 train_data: Sequence[PromptedExample], sampler, constructor=None, ref_engine=None,
                 evaluator=None):
        self.s = settings
        self.engine, self.info, self.tok = engine, info, tokenizer
        self.rollout, self.grader, self.monitor = rollout, grader, monitor
        self.train_data, self.sampler = train_data, sampler
        self.constructor = constructor  # None for GRPO
        self.ref_engine = ref_engine
        self.evaluator = evaluator  # None: no in-training evaluation
        self.pad_id = tokenizer.pad_token_id
        self.estimator = get_advantage_estimator(settings.advantage)

    # ------------------------------------------------------------------ phases

    def rollout_phase(self, step: int) -> RolloutOut:
        indices = shard(self.sampler.next_indices(self.s.questions_per_step), self.info.rank, self.info.world_size)
        questions = [self.train_data[i] for i in indices]
        self.rollout.sync_weights(step)
        out = generate(self.rollout, self.tok, [q.prompt_ids for q in questions], self.s.sampling, self.info.device)
        samples = [Sample(prompt_ids=questions[q].prompt_ids, response_ids=ids,
                          group_id=f"s{step}r{self.info.rank}q{q}", reward=0.0, question=q)
                   for ids, q in zip(out.token_ids, out.prompt_index)]
        m = StepMetrics()
        m.mean("rollout/response_len_mean", sum(out.lengths), len(out.lengths))
        m.mean("rollout/truncated_rate", sum(out.truncated), len(out.truncated))
        m.max("rollout/response_len_max", max(out.lengths))
        return RolloutOut(questions, samples, out.texts, out.truncated, m)

    def reward_phase(self, out: RolloutOut) -> StepMetrics:
        answers = [out.questions[s.question].example.answer for s in out.samples]
        graded = self.grader.grade(list(zip(out.texts, answers)), require_box=True)
        for sample, ok in zip(out.samples, graded.correct):
            sample.reward = float(ok)
        groups: dict[str, list[float]] = {}
        for s in out.samples:
            groups.setdefault(s.group_id, []).append(s.reward)
        n = len(out.samples)
        m = StepMetrics()
        m.mean("rollout/reward_mean", sum(s.reward for s in out.samples), n)
        m.mean("rollout/acc", sum(graded.correct), n)
        m.mean("rollout/zero_std_group_frac", sum(1 for r in groups.values() if max(r) == min(r)), len(groups))
        m.mean("reward/timeout_rate", graded.timeouts, n)
        m.mean("reward/error_rate", graded.errors, n)
        m.mean("reward/no_box_rate", graded.no_box, n)
        m.mean("reward/refused_rate", graded.refused, n)
        return m

    def advantage_phase(self, samples: list[Sample]) -> StepMetrics:
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        constructed = torch.tensor([s.constructed for s in samples], dtype=torch.bool)
        out = self.estimator(rewards, [s.group_id for s in samples], constructed, self.s.advantage_params)
        for s, a in zip(samples, out.advantages.tolist()):
            s.advantage = a
        metrics = StepMetrics()
        out.add_to(metrics)
        return metrics

    def update_phase(self, samples: list[Sample], step: int) -> StepMetrics:
        mbs, dev = self.s.micro_batch_size, self.info.device
        metrics = StepMetrics()
        old_logp = weights = ref_logp = None
        if self.s.ots is not None:
            # The pre-update policy on the constructed samples, before the first update.
            logp, entropy = per_token_stats(self.engine, samples, mbs, self.pad_id, dev, with_entropy=True,
                                            which=lambda s: s.constructed)
            ots = self.s.ots(samples, logp, entropy)
            weights = ots.weights
            ots.add_to(metrics)
        if self.s.ppo_epochs > 1 or self.s.mini_batches > 1:
            # Later updates no longer see the pre-update policy in their own forward.
            old_logp, _ = per_token_stats(self.engine, samples, mbs, self.pad_id, dev, with_entropy=False)
        if self.ref_engine is not None:
            ref_logp, _ = per_token_stats(self.ref_engine, samples, mbs, self.pad_id, dev, with_entropy=False)
        gen = torch.Generator().manual_seed(self.s.seed * 7919 + step)
        updates = []
        for _ in range(self.s.ppo_epochs):
            for indices in split_mini_batches(len(samples), self.s.mini_batches, gen):
                updates.append(optimizer_step(self.engine, samples, indices, self.s.loss, micro_batch_size=mbs,
                                              pad_id=self.pad_id, old_logp=old_logp, token_weights=weights,
                                              ref_logp=ref_logp, world_size=self.info.world_size))
        metrics.update(update_metrics(updates))
        return metrics

    # ------------------------------------------------------------------ the step

    def step(self, step: int) -> dict[str, float]:
        metrics = StepMetrics()
        start = time.perf_counter()
        with timed("rollout", metrics):
            out = self.rollout_phase(step)
        with timed("reward", metrics):
            metrics.update(self.reward_phase(out))
        samples = list(out.samples)
        if self.constructor is not None:
            with timed("construct", metrics):
                constructed, cmetrics = self.constructor.construct(out, step)
            samples += constructed
            metrics.update(cmetrics)
        with timed("advantages", metrics):
            metrics.update(self.advantage_phase(samples))
        with timed("update", metrics):
            metrics.update(self.update_phase(samples, step))
        metrics.update(out.metrics)
        metrics.local("timing/step", time.perf_counter() - start)
        metrics.throughput("perf/tokens_per_s", sum(len(s.response_ids) for s in out.samples),
                           metrics["timing/rollout"])
        if self.s.text_every and step % self.s.text_every == 0:
            self._log_text(out, step)
        if self.evaluator is not None and self.evaluator.due(step):
            with timed("eval", metrics):
                metrics.update(self.evaluator.run(step))
        return metrics.reduce(all_reduce_, self.info.device)

    def _log_text(self, out: RolloutOut, step: int) -> None:
        for i in range(min(self.s.text_samples, len(out.samples))):
            s = out.samples[i]
            q = out.questions[s.question].example
            self.monitor.text(f"samples/{i}", f"PROMPT:\n{q.problem}\n\nRESPONSE:\n{out.texts[i]}\n\n"
                                              f"ANSWER: {q.answer}   REWARD: {s.reward}", step)
