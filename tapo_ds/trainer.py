"""The RL step as named phases — rollout -> reward -> construct -> advantages -> update — and the loop.

Each phase is timed and returns its outputs plus its rank's :class:`~tapo_ds.metrics.StepMetrics`,
reduced over ranks once at the end of the step. ``construct`` is TAPO's phase; with
``algorithm.name: grpo`` it is skipped and the rest of the code path is the same. OPSD
(``algorithm.name: opsd``) has a teacher instead: its update is the divergence to the teacher, and
the advantages phase is skipped. DAPO's dynamic sampling adds a ``fill`` phase after the reward.
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
from tapo_ds.algorithms.dapo import informative, overlong_penalty
from tapo_ds.batch import Sample, split_mini_batches
from tapo_ds.construct import Plan
from tapo_ds.data import PromptedExample, shard
from tapo_ds.engine import all_reduce_
from tapo_ds.generation import generate, generate_with_followups
from tapo_ds.in_rollout import GradeThenFollow
from tapo_ds.metrics import StepMetrics
from tapo_ds.trajectory import OTS, prefix_push, reflects
from tapo_ds.update import LossSettings, optimizer_step, per_token_stats, update_metrics

log = logging.getLogger(__name__)


@contextlib.contextmanager
def timed(name: str, metrics: StepMetrics):
    start = time.perf_counter()
    yield
    metrics.local(f"timing/{name}", time.perf_counter() - start)


GRADE_COUNTS = ("correct", "timeouts", "errors", "no_box", "refused")


def _add_counts(counts: dict[str, int], graded) -> None:
    counts["correct"] += sum(graded.correct)
    for k in GRADE_COUNTS[1:]:
        counts[k] += getattr(graded, k)


@dataclass
class RolloutOut:
    questions: list[PromptedExample]
    samples: list[Sample]  # one per response, group_id = question uid
    texts: list[str]
    truncated: list[bool]
    graded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GRADE_COUNTS, 0))

    def extend(self, more: "RolloutOut") -> None:
        """Append another draw of the same step (its question indices shift past this one's)."""
        shift = len(self.questions)
        for s in more.samples:
            s.question += shift
        self.questions += more.questions
        self.samples += more.samples
        self.texts += more.texts
        self.truncated += more.truncated
        for k in GRADE_COUNTS:
            self.graded[k] += more.graded[k]

    def keep_groups(self, group_ids: set[str]) -> "RolloutOut":
        """The samples of ``group_ids`` (same questions list, so the indices stay valid)."""
        rows = [i for i, s in enumerate(self.samples) if s.group_id in group_ids]
        return RolloutOut(self.questions, [self.samples[i] for i in rows], [self.texts[i] for i in rows],
                          [self.truncated[i] for i in rows], dict(self.graded))


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
    overlong_window: int = 0  # DAPO's soft overlong punishment (0: off)
    overlong_penalty: float = 1.0
    mask_truncated: bool = False  # DAPO: truncated responses get no loss
    dynamic_sampling: bool = False  # DAPO: fill the step with informative groups
    dynamic_sampling_max_rounds: int = 3
    constructions_in_rollout: bool = False  # TAPO: constructions start inside the rollout (tapo.in_rollout)


class RLTrainer:
    def __init__(self, *, settings: RLSettings, engine, info, tokenizer, rollout, grader, monitor,
                 train_data: Sequence[PromptedExample], sampler, constructor=None, ref_engine=None,
                 evaluator=None, teacher=None):
        self.s = settings
        self.engine, self.info, self.tok = engine, info, tokenizer
        self.rollout, self.grader, self.monitor = rollout, grader, monitor
        self.train_data, self.sampler = train_data, sampler
        self.constructor = constructor  # None for GRPO
        self.teacher = teacher  # OPSD's (tapo_ds.opsd.Teacher); None otherwise
        self.ref_engine = ref_engine
        self.evaluator = evaluator  # None: no in-training evaluation
        self.pad_id = tokenizer.pad_token_id
        self.estimator = get_advantage_estimator(settings.advantage) if teacher is None else None
        if settings.constructions_in_rollout and constructor is not None and not self.constructs_in_rollout:
            log.warning("tapo.in_rollout: constructions run after the rollout instead (it needs the policy as "
                        "constructor, no dynamic sampling, and a rollout that can take follow-up rows: "
                        "rollout.engine tapo, gather once on several ranks, no sliding-window attention)")

    # ------------------------------------------------------------------ phases

    def _draw(self, step: int) -> list[PromptedExample]:
        indices = shard(self.sampler.next_indices(self.s.questions_per_step), self.info.rank, self.info.world_size)
        return [self.train_data[i] for i in indices]

    def _sample(self, step: int, q: int, questions, ids: list[int], cut: bool, suffix: str = "") -> Sample:
        return Sample(prompt_ids=questions[q].prompt_ids, response_ids=ids, group_id=f"s{step}r{self.info.rank}q{q}{suffix}",
                      reward=0.0, question=q, in_loss=not (self.s.mask_truncated and cut))

    def _reward(self, correct: bool, n_tokens: int) -> float:
        """Correctness plus DAPO's overlong penalty where it is on."""
        return float(correct) + overlong_penalty(n_tokens, self.s.sampling.max_new_tokens, self.s.overlong_window,
                                                 self.s.overlong_penalty)

    def rollout_phase(self, step: int, draw: int = 0) -> RolloutOut:
        questions = self._draw(step)
        if draw == 0:
            self.rollout.sync_weights(step)
        out = generate(self.rollout, self.tok, [q.prompt_ids for q in questions], self.s.sampling, self.info.device)
        suffix = f"d{draw}" if draw else ""
        samples = [self._sample(step, q, questions, ids, cut, suffix)
                   for ids, q, cut in zip(out.token_ids, out.prompt_index, out.truncated)]
        return RolloutOut(questions, samples, out.texts, out.truncated)

    def reward_phase(self, out: RolloutOut) -> None:
        """Grade every response."""
        answers = [out.questions[s.question].example.answer for s in out.samples]
        graded = self.grader.grade(list(zip(out.texts, answers)), require_box=True)
        for sample, ok in zip(out.samples, graded.correct):
            sample.reward = self._reward(ok, len(sample.response_ids))
        out.graded = {k: 0 for k in GRADE_COUNTS}
        _add_counts(out.graded, graded)

    @property
    def constructs_in_rollout(self) -> bool:
        """TAPO's constructions start inside the rollout (``tapo.in_rollout``; see :meth:`fused_phase`): the
        policy writes them, no dynamic sampling reorders the step, and the rollout can take follow-up rows."""
        return (self.constructor is not None and self.constructor.generates and self.s.constructions_in_rollout
                and not self.s.dynamic_sampling and getattr(self.rollout, "takes_followups", False))

    def fused_phase(self, step: int) -> tuple[RolloutOut, Plan, list[str], int, float]:
        """Rollout, reward and the constructions' generation in one decode (tapo_ds.in_rollout): each
        question is graded when its K samples have ended, its pairs selected, and its construction prompts
        join the running batch. Returns the rollout (rewards in), the construction plan in question order,
        its outputs, the tokens they took and the seconds the decode waited for grades."""
        questions = self._draw(step)
        self.rollout.sync_weights(step)
        K, n = self.s.samples_per_question, len(questions) * self.s.samples_per_question
        out = RolloutOut(questions, [None] * n, [""] * n, [False] * n)
        parts: dict[int, Plan] = {}

        def grade(q: int, token_ids: list[list[int]], truncated: list[bool]):
            texts = [self.tok.decode(t, skip_special_tokens=True) for t in token_ids]
            answer = questions[q].example.answer
            return token_ids, truncated, texts, self.grader.grade([(t, answer) for t in texts], require_box=True)

        def follow_up(q: int, graded) -> list[list[int]]:
            token_ids, truncated, texts, result = graded
            for j in range(K):
                i = q * K + j
                out.samples[i] = self._sample(step, q, questions, token_ids[j], truncated[j])
                out.samples[i].reward = self._reward(result.correct[j], len(token_ids[j]))
                out.texts[i], out.truncated[i] = texts[j], truncated[j]
            _add_counts(out.graded, result)
            parts[q] = self.constructor.plan(out, step, [q])
            return parts[q].prompt_ids

        with GradeThenFollow(self.constructor.s.sampling, grade, follow_up, self.constructor.lookup) as follow:
            extra = generate_with_followups(self.rollout, self.tok, [q.prompt_ids for q in questions],
                                            self.s.sampling, follow, self.info.device)
        if any(s is None for s in out.samples):
            raise RuntimeError("the rollout ended with questions whose samples were never graded")
        self.constructor.count_drafts(extra.draft_tokens, extra.draft_accepted)
        by_question: dict[int, list[str]] = {}
        for q, ids in zip(follow.started, extra.token_ids):
            by_question.setdefault(q, []).append(self.tok.decode(ids, skip_special_tokens=True))
        outputs = [text for q in sorted(parts) for text in by_question.get(q, [])]
        return out, Plan().merged(parts), outputs, sum(len(t) for t in extra.token_ids), follow.wait_s

    def fill_phase(self, first: RolloutOut, step: int) -> tuple[RolloutOut, RolloutOut, StepMetrics]:
        """DAPO's dynamic sampling: ``(kept, drawn, metrics)``. Groups whose rewards are all equal are
        dropped and more questions drawn until this rank holds its share of B informative groups or the
        extra draws run out; every rank makes the same number of draws (the decision is global)."""
        target = self.s.questions_per_step // self.info.world_size
        drawn, draws = first, 0

        def kept_ids() -> list[str]:
            groups: dict[str, list[float]] = {}
            for s in drawn.samples:
                groups.setdefault(s.group_id, []).append(s.reward)
            return [g for g, r in groups.items() if informative(r)]

        while draws < self.s.dynamic_sampling_max_rounds:
            short = torch.tensor([float(max(0, target - len(kept_ids())))], device=self.info.device)
            if float(all_reduce_(short, "max")) == 0.0:
                break
            draws += 1
            more = self.rollout_phase(step, draw=draws)
            self.reward_phase(more)
            drawn.extend(more)
        kept = kept_ids()[:target]
        m = StepMetrics()
        m.local("rollout/dynamic_sampling_draws", draws)
        m.sum("rollout/drawn_questions", len(drawn.questions))
        m.sum("rollout/informative_groups", len(kept))
        return drawn.keep_groups(set(kept)), drawn, m

    @staticmethod
    def rollout_metrics(out: RolloutOut) -> StepMetrics:
        """Over every response the step generated (all draws)."""
        lengths = [len(s.response_ids) for s in out.samples]
        groups: dict[str, list[float]] = {}
        for s in out.samples:
            groups.setdefault(s.group_id, []).append(s.reward)
        n, g = len(out.samples), out.graded
        m = StepMetrics()
        m.mean("rollout/response_len_mean", sum(lengths), len(lengths))
        m.mean("rollout/truncated_rate", sum(out.truncated), len(out.truncated))
        # does the policy itself write micro-reflections (what TAPO's constructed samples teach)?
        m.mean("rollout/reflection_rate", sum(reflects(t) for t in out.texts if t is not None), n)
        m.max("rollout/response_len_max", max(lengths, default=0))
        m.mean("rollout/reward_mean", sum(s.reward for s in out.samples), n)
        m.mean("rollout/acc", g["correct"], n)
        m.mean("rollout/zero_std_group_frac", sum(1 for r in groups.values() if max(r) == min(r)), len(groups))
        m.mean("reward/timeout_rate", g["timeouts"], n)
        m.mean("reward/error_rate", g["errors"], n)
        m.mean("reward/no_box_rate", g["no_box"], n)
        m.mean("reward/refused_rate", g["refused"], n)
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
        # Every rank names them (the reduction is by name); without constructions they are left out.
        metrics.mean("tapo/prefix_push", *prefix_push(samples, weights), if_empty=None)
        metrics.mean("tapo/prefix_token_frac", sum(s.prefix_tokens for s in samples if s.constructed),
                     sum(len(s.response_ids) for s in samples if s.constructed), if_empty=None)
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
        if self.constructs_in_rollout:
            out, samples, generated = self._rollout_constructing(step, metrics)
            drawn = out
        else:
            out, drawn, samples, generated = self._rollout_then_construct(step, metrics)
        if self.teacher is None:
            with timed("advantages", metrics):
                metrics.update(self.advantage_phase(samples))
            with timed("update", metrics):
                metrics.update(self.update_phase(samples, step))
        else:
            with timed("update", metrics):
                metrics.update(self.distill_phase(out))
        metrics.local("timing/step", time.perf_counter() - start)
        metrics.throughput("perf/tokens_per_s", generated, metrics["timing/rollout"])  # the rollout phase's
        if torch.cuda.is_available() and self.info.device.type == "cuda":
            metrics.max("perf/peak_gpu_mem_gb", torch.cuda.max_memory_allocated(self.info.device) / 2**30)
        if self.s.text_every and step % self.s.text_every == 0:
            self._log_text(drawn, step)
        if self.evaluator is not None and self.evaluator.due(step):
            with timed("eval", metrics):
                metrics.update(self.evaluator.run(step))
        return metrics.reduce(all_reduce_, self.info.device)

    def _rollout_then_construct(self, step: int, metrics: StepMetrics):
        """The phases one after another: (the step's groups, every drawn group, samples to train on, tokens the
        rollout phase generated)."""
        with timed("rollout", metrics):
            out = self.rollout_phase(step)
        with timed("reward", metrics):
            self.reward_phase(out)
        drawn, generated = out, sum(len(s.response_ids) for s in out.samples)
        if self.s.dynamic_sampling:
            with timed("fill", metrics):
                out, drawn, fmetrics = self.fill_phase(out, step)
            metrics.update(fmetrics)
        metrics.update(self.rollout_metrics(drawn))
        samples = list(out.samples)
        if self.constructor is not None:
            with timed("construct", metrics):
                constructed, cmetrics = self.constructor.construct(out, step)
            samples += constructed
            metrics.update(cmetrics)
        return out, drawn, samples, generated

    def _rollout_constructing(self, step: int, metrics: StepMetrics):
        """TAPO with its constructions inside the rollout: ``timing/rollout`` is the whole decode (samples,
        their grading, the constructions' generation), ``timing/construct`` what follows it (parse, verify,
        assemble)."""
        with timed("rollout", metrics):
            out, plan, outputs, construction_tokens, wait_s = self.fused_phase(step)
        metrics.local("timing/grade_wait", wait_s)
        metrics.update(self.rollout_metrics(out))
        with timed("construct", metrics):
            constructed, cmetrics = self.constructor.complete(out, plan, outputs, step, construction_tokens)
        metrics.update(cmetrics)
        generated = sum(len(s.response_ids) for s in out.samples) + construction_tokens
        return out, list(out.samples) + constructed, generated

    def distill_phase(self, out: RolloutOut) -> StepMetrics:
        """OPSD: teacher prompts (privileged information per sample), then one optimizer step."""
        prompts, metrics = self.teacher.prompts(out.samples, [q.example.problem for q in out.questions],
                                                [q.example.solution for q in out.questions], out.texts)
        metrics.update(self.teacher.update(self.engine, out.samples, prompts, micro_batch_size=self.s.micro_batch_size,
                                           pad_id=self.pad_id, world_size=self.info.world_size))
        return metrics

    def _log_text(self, out: RolloutOut, step: int) -> None:
        for i in range(min(self.s.text_samples, len(out.samples))):
            s = out.samples[i]
            q = out.questions[s.question].example
            self.monitor.text(f"samples/{i}", f"PROMPT:\n{q.problem}\n\nRESPONSE:\n{out.texts[i]}\n\n"
                                              f"ANSWER: {q.answer}   REWARD: {s.reward}", step)
