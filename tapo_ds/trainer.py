"""The RL step as named phases — rollout -> reward -> construct -> advantages -> update — and the loop.

Each phase is timed and returns its outputs plus a metrics dict. ``construct`` is TAPO's
phase; with ``algorithm.name: grpo`` it is skipped and the rest of the code path is the same.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from deepspeed.runtime.rollout.base import RolloutRequest, SamplingConfig

from tapo_ds.algorithms import AdvantageParams, get_advantage_estimator
from tapo_ds.batch import Sample, left_pad, split_mini_batches
from tapo_ds.data import PromptedExample, shard
from tapo_ds.engine import all_reduce_
from tapo_ds.update import LossSettings, optimizer_step, per_token_stats

log = logging.getLogger(__name__)


@contextlib.contextmanager
def timed(name: str, metrics: dict):
    start = time.perf_counter()
    yield
    metrics[f"timing/{name}"] = time.perf_counter() - start


def global_means(sums: dict[str, tuple[float, float]], device) -> dict[str, float]:
    """Means over all ranks from per-rank (sum, count) pairs, in one all-reduce."""
    keys = sorted(sums)
    t = torch.tensor([v for k in keys for v in sums[k]], dtype=torch.float64, device=device)
    all_reduce_(t, "sum")
    return {k: float(t[2 * i] / t[2 * i + 1]) if t[2 * i + 1] > 0 else 0.0 for i, k in enumerate(keys)}


def global_max(value: float, device) -> float:
    return float(all_reduce_(torch.tensor([value], dtype=torch.float64, device=device), "max").item())


@dataclass
class RolloutOut:
    questions: list[PromptedExample]
    samples: list[Sample]  # one per response, group_id = question uid
    texts: list[str]
    truncated: list[bool]
    metrics: dict = field(default_factory=dict)


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
        metrics: dict = {}
        indices = shard(self.sampler.next_indices(self.s.questions_per_step), self.info.rank, self.info.world_size)
        questions = [self.train_data[i] for i in indices]
        ids, mask = left_pad([q.prompt_ids for q in questions], self.pad_id)
        self.rollout.sync_weights(step)
        result = self.rollout.generate(RolloutRequest(ids.to(self.info.device), mask.to(self.info.device)),
                                       self.s.sampling)
        samples, texts, truncated = [], [], []
        lengths = result.response_lengths.tolist()
        for row, (q_idx, n) in enumerate(zip(result.prompt_index.tolist(), lengths)):
            response = result.response_ids[row, :n].tolist()
            samples.append(Sample(prompt_ids=questions[q_idx].prompt_ids, response_ids=response,
                                  group_id=f"s{step}r{self.info.rank}q{q_idx}", reward=0.0,
                                  question=q_idx))
            texts.append(self.tok.decode(response, skip_special_tokens=True))
            truncated.append(bool(result.truncated[row]))
        metrics.update(global_means({
            "rollout/response_len_mean": (float(sum(lengths)), float(len(lengths))),
            "rollout/truncated_rate": (float(sum(truncated)), float(len(truncated))),
        }, self.info.device))
        metrics["rollout/response_len_max"] = global_max(float(max(lengths)), self.info.device)
        metrics["_rollout_tokens"] = float(sum(lengths))
        return RolloutOut(questions, samples, texts, truncated, metrics)

    def reward_phase(self, out: RolloutOut) -> dict:
        answers = [out.questions[s.question].example.answer for s in out.samples]
        graded = self.grader.grade(list(zip(out.texts, answers)), require_box=True)
        for sample, ok in zip(out.samples, graded.correct):
            sample.reward = float(ok)
        groups: dict[str, list[float]] = {}
        for s in out.samples:
            groups.setdefault(s.group_id, []).append(s.reward)
        zero_std = sum(1 for r in groups.values() if max(r) == min(r))
        n = float(len(out.samples))
        return global_means({
            "rollout/reward_mean": (sum(s.reward for s in out.samples), n),
            "rollout/acc": (float(sum(graded.correct)), n),
            "rollout/zero_std_group_frac": (float(zero_std), float(len(groups))),
            "reward/timeout_rate": (float(graded.timeouts), n),
            "reward/error_rate": (float(graded.errors), n),
            "reward/no_box_rate": (float(graded.no_box), n),
            "reward/refused_rate": (float(graded.refused), n),
        }, self.info.device)

    def advantage_phase(self, samples: list[Sample]) -> dict:
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        constructed = torch.tensor([s.constructed for s in samples], dtype=torch.bool)
        out = self.estimator(rewards, [s.group_id for s in samples], constructed, self.s.advantage_params)
        for s, a in zip(samples, out.advantages.tolist()):
            s.advantage = a
        # Estimator metrics are per rank: counts add up, fractions are weighted by group count,
        # and ratios over other counts are divided once the counts are summed.
        groups = out.metrics.get("adv/num_groups", 0.0)
        keys = sorted(out.metrics)
        t = torch.tensor([out.metrics[k] * (groups if k.endswith("_frac") else 1.0) for k in keys],
                         dtype=torch.float64, device=self.info.device)
        all_reduce_(t, "sum")
        total_groups = float(t[keys.index("adv/num_groups")]) if "adv/num_groups" in keys else 0.0
        reduced = {k: float(v) / total_groups if k.endswith("_frac") and total_groups else float(v)
                   for k, v in zip(keys, t.tolist())}
        reduced.update(out.fractions(reduced))
        return reduced

    def update_phase(self, samples: list[Sample], step: int) -> dict:
        mbs, dev = self.s.micro_batch_size, self.info.device
        on_policy = self.s.ppo_epochs == 1 and self.s.mini_batches == 1
        needs_ots = self.constructor is not None and self.constructor.ots_enabled
        old_logp = token_weights = ref_logp = None
        if on_policy:
            token_weights = self.constructor.ots_weight_fn() if needs_ots else None
        else:
            old_logp, ent = per_token_stats(self.engine, samples, mbs, self.pad_id, dev, with_entropy=needs_ots,
                                            entropy_for=lambda s: s.constructed)
            if needs_ots:
                token_weights = self.constructor.ots_weights(samples, old_logp, ent)
        if self.ref_engine is not None:
            ref_logp, _ = per_token_stats(self.ref_engine, samples, mbs, self.pad_id, dev, with_entropy=False)
        gen = torch.Generator().manual_seed(self.s.seed * 7919 + step)
        updates = []
        for _ in range(self.s.ppo_epochs):
            for indices in split_mini_batches(len(samples), self.s.mini_batches, gen):
                updates.append(optimizer_step(self.engine, samples, indices, self.s.loss, micro_batch_size=mbs,
                                              pad_id=self.pad_id, old_logp=old_logp, token_weights=token_weights,
                                              ref_logp=ref_logp, world_size=self.info.world_size))
        # Means over the step's optimizer updates; the learning rate is the last one's.
        metrics = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        metrics["actor/lr"] = updates[-1]["actor/lr"]
        if needs_ots:
            metrics.update(self.constructor.pop_ots_metrics(dev))
        return metrics

    # ------------------------------------------------------------------ the step

    def step(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
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
        wall = time.perf_counter() - start
        tokens = float(all_reduce_(torch.tensor([metrics.pop("_rollout_tokens")], dtype=torch.float64,
                                                device=self.info.device), "sum").item())
        metrics["timing/step"] = wall
        metrics["perf/tokens_per_s"] = tokens / max(metrics["timing/rollout"], 1e-9)
        if self.s.text_every and step % self.s.text_every == 0:
            self._log_text(out, step)
        if self.evaluator is not None and self.evaluator.due(step):
            with timed("eval", metrics):
                metrics.update(self.evaluator.run(step))
        return metrics

    def _log_text(self, out: RolloutOut, step: int) -> None:
        for i in range(min(self.s.text_samples, len(out.samples))):
            s = out.samples[i]
            q = out.questions[s.question].example
            self.monitor.text(f"samples/{i}", f"PROMPT:\n{q.problem}\n\nRESPONSE:\n{out.texts[i]}\n\n"
                                              f"ANSWER: {q.answer}   REWARD: {s.reward}", step)
