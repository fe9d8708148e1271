"""Advantage estimators: per-group reward normalisation (GRPO) and TAPO's decoupled variant.

Every estimator has the signature of :data:`AdvantageFn`, so the trainer picks one by the
config's algorithm name and calls it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .registry import Registry

REFLECTED_SUFFIX = "_reflected"


@dataclass(frozen=True)
class AdvantageParams:
    eps: float = 1e-6
    # False reproduces the paper's "w/o DAE" ablation: constructed samples share the uid.
    decoupled: bool = True
    # What a reflected group of size >= 2 with all rewards equal gets: "zero" (the paper) or
    # "reward" (A = r, as a singleton reflected group gets); see :func:`equal_reward_rule_names`.
    equal_reward_groups: str = "zero"


@dataclass
class AdvantageOutput:
    advantages: Tensor  # [N], dtype of the rewards
    group_ids: list[str]  # the group id each sample was normalised in
    # This rank's statistics, by how they combine over ranks: counts add up; a mean is its
    # (total, count), divided once both are summed (a fraction of groups is not an average of fractions).
    sums: dict[str, float] = field(default_factory=dict)
    means: dict[str, tuple[float, float]] = field(default_factory=dict)

    def add_to(self, metrics) -> None:
        """Into a :class:`tapo_ds.metrics.StepMetrics`."""
        for name, value in self.sums.items():
            metrics.sum(name, value)
        for name, (total, count) in self.means.items():
            metrics.mean(name, total, count)


AdvantageFn = Callable[[Tensor, Sequence[str], Tensor, AdvantageParams], AdvantageOutput]

_ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    return _ADVANTAGES.register(name)


def get_advantage_estimator(name: str) -> AdvantageFn:
    return _ADVANTAGES.get(name)


def advantage_estimator_names() -> list[str]:
    return _ADVANTAGES.names()


@dataclass
class _GroupStats:
    index: Tensor  # [N] long, the group of each sample
    count: Tensor  # [G] float64
    constant: Tensor  # [G] bool, all rewards of the group equal (size-1 groups included)
    normalised: Tensor  # [N] float64, (r - mean_g) / (std_g + eps), exactly 0 in constant groups


def _group_stats(rewards: Tensor, group_ids: Sequence[str], eps: float) -> _GroupStats:
    # Strings cannot live on a device, so the only Python loop is the id -> index map.
    lookup: dict[str, int] = {}
    index = torch.tensor(
        [lookup.setdefault(g, len(lookup)) for g in group_ids],
        dtype=torch.long,
        device=rewards.device,
    )
    n_groups = len(lookup)
    # float64 so the statistics do not depend on the reward dtype or the group order.
    r = rewards.detach().to(torch.float64)
    zeros = r.new_zeros(n_groups)
    count = zeros.index_add(0, index, torch.ones_like(r))
    mean = zeros.index_add(0, index, r) / count
    deviation = r - mean[index]
    # Two passes (mean, then squared deviations) avoid E[r^2] - E[r]^2 cancellation.
    std = (zeros.index_add(0, index, deviation * deviation) / count).sqrt()
    # Equal rewards are detected exactly: their rounded mean can differ from r by an ulp,
    # which divided by eps would give a spurious nonzero advantage.
    group_max = r.new_full((n_groups,), -torch.inf).scatter_reduce(0, index, r, "amax")
    group_min = r.new_full((n_groups,), torch.inf).scatter_reduce(0, index, r, "amin")
    constant = group_max == group_min
    normalised = torch.where(constant[index], 0.0, deviation / (std[index] + eps))
    return _GroupStats(index=index, count=count, constant=constant, normalised=normalised)


# Which groups get A = r instead of their normalised advantage, from the reflected groups
# (``reflected``, [G] bool) and the group statistics; selected by ``equal_reward_groups``.
EqualRewardRule = Callable[[Tensor, _GroupStats], Tensor]

_EQUAL_REWARD_RULES: Registry[EqualRewardRule] = Registry("equal_reward_groups rule")


def equal_reward_rule_names() -> list[str]:
    return _EQUAL_REWARD_RULES.names()


@_EQUAL_REWARD_RULES.register("zero")
def _singletons_only(reflected: Tensor, stats: _GroupStats) -> Tensor:
    """The paper: only a reflected singleton gets A = r; a larger equal-reward group keeps A = 0."""
    return reflected & (stats.count == 1)


@_EQUAL_REWARD_RULES.register("reward")
def _all_equal_reward_groups(reflected: Tensor, stats: _GroupStats) -> Tensor:
    """Beyond the paper: every reflected group whose rewards are all equal gets A = r."""
    return reflected & stats.constant


def _check_inputs(rewards: Tensor, group_ids: Sequence[str], constructed: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if len(group_ids) != rewards.numel() or constructed.shape != rewards.shape:
        raise ValueError(
            f"rewards ({rewards.numel()}), group_ids ({len(group_ids)}) and constructed "
            f"({tuple(constructed.shape)}) must describe the same samples"
        )


def _group_metrics(stats: _GroupStats) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    n_groups = float(stats.constant.numel())
    return {"adv/num_groups": n_groups}, {"adv/zero_std_group_frac": (float(stats.constant.sum().item()), n_groups)}


@register_advantage("grpo")
def grpo_advantages(
    rewards: Tensor, group_ids: Sequence[str], constructed: Tensor, params: AdvantageParams
) -> AdvantageOutput:
    """A = (r - mean_g) / (std_g + eps) per group id, population std.

    ``constructed`` is ignored: plain GRPO has no notion of constructed samples.
    """
    _check_inputs(rewards, group_ids, constructed)
    stats = _group_stats(rewards, group_ids, params.eps)
    sums, means = _group_metrics(stats)
    return AdvantageOutput(
        advantages=stats.normalised.to(rewards.dtype), group_ids=list(group_ids), sums=sums, means=means
    )


@register_advantage("tapo")
def tapo_advantages(
    rewards: Tensor, group_ids: Sequence[str], constructed: Tensor, params: AdvantageParams
) -> AdvantageOutput:
    """Decoupled Advantage Estimation (docs/method.md §DAE).

    Constructed samples are normalised in a group of their own (``uid + "_reflected"``)
    when ``params.decoupled``, otherwise inside their question's original group.
    A reflected group is a group made only of constructed samples; one of size 1 gets
    A = r (there is no sibling to compare with, so it is weighted SFT on that sample).
    One of size >= 2 with equal rewards gets A = 0 like any constant group, or A = r with
    ``params.equal_reward_groups == "reward"``.
    Without constructed samples this is exactly :func:`grpo_advantages`.

    ``tapo/reflected_mixed_frac``: among the reflected groups of size >= 2 (over all ranks), the
    fraction whose rewards are not all equal — the groups whose constructions push a right
    reconstruction up against a failed one. Singletons are left out of both counts; 0 when there
    is no reflected group of size >= 2.
    """
    _check_inputs(rewards, group_ids, constructed)
    rule = _EQUAL_REWARD_RULES.get(params.equal_reward_groups)
    is_constructed = constructed.to(device=rewards.device, dtype=torch.bool)
    flags = is_constructed.tolist()
    effective = [
        g + REFLECTED_SUFFIX if (c and params.decoupled) else g for g, c in zip(group_ids, flags)
    ]
    stats = _group_stats(rewards, effective, params.eps)

    n_constructed = stats.count.new_zeros(stats.count.shape).index_add(
        0, stats.index, is_constructed.to(torch.float64)
    )
    reflected = n_constructed == stats.count
    singleton = reflected & (stats.count == 1)
    multi = reflected & ~singleton
    gets_reward = rule(reflected, stats)
    advantages = torch.where(
        gets_reward[stats.index], rewards.detach().to(torch.float64), stats.normalised
    )
    sums, means = _group_metrics(stats)
    mixed, n_multi = float((multi & ~stats.constant).sum().item()), float(multi.sum().item())
    sums.update({
        "tapo/reflected_groups": float(reflected.sum().item()),
        "tapo/reflected_singletons": float(singleton.sum().item()),
        "tapo/reflected_zero_std_groups": float((multi & stats.constant).sum().item()),
        "tapo/reflected_mixed_groups": mixed,
        "tapo/reflected_multi_groups": n_multi,
    })
    means["tapo/reflected_mixed_frac"] = (mixed, n_multi)
    return AdvantageOutput(advantages=advantages.to(rewards.dtype), group_ids=effective, sums=sums, means=means)
