"""RL algorithm pieces as pure torch functions, each variant a registry entry by name.

Choices (see docs/method.md §Choices) that live here, with their config keys:

- Advantages (advantages): per group id, population std, ``algorithm.adv_eps``; equal rewards
  give exactly 0. TAPO (``algorithm.name: tapo``) normalises constructed samples in
  ``uid + "_reflected"`` groups (``tapo.decoupled_advantages``); a reflected group of one gets
  A = r_ref; a larger one with equal rewards gets 0 (``tapo.equal_reward_groups: zero``) or
  A = r_ref (``reward``, beyond the paper).
- Policy loss (policy_loss): ``algorithm.policy_loss: ppo_clip`` with ``algorithm.clip_low`` =
  ``algorithm.clip_high`` = 0.2; OTS weights multiply the per-token loss.
- Aggregation (aggregation): ``algorithm.loss_agg`` seq-mean-token-mean (the paper) or
  token-mean, over the whole optimizer step; constructed samples pooled with the originals
  (``tapo.loss_combination: pooled``) or averaged apart (``separate``), scaled by ``tapo.lam``.
- KL (kl): none by default (``algorithm.kl_coef: 0``); ``algorithm.kl_estimator`` k3 or k1.
"""

from .advantages import (
    REFLECTED_SUFFIX,
    AdvantageOutput,
    AdvantageParams,
    advantage_estimator_names,
    equal_reward_rule_names,
    get_advantage_estimator,
    grpo_advantages,
    register_advantage,
    tapo_advantages,
)
from .aggregation import (
    CONSTRUCTED_PART,
    NUM_PARTS,
    ORIGINAL_PART,
    GlobalCounts,
    aggregation_names,
    combination_names,
    local_counts,
    micro_batch_loss,
    register_aggregation,
    register_combination,
    token_coefficients,
)
from .kl import get_kl_estimator, kl_estimator_names, register_kl
from .logprobs import token_logprobs_and_entropy
from .policy_loss import (
    PolicyLossOutput,
    PolicyLossParams,
    get_policy_loss,
    masked_mean,
    policy_loss_names,
    ppo_clip_loss,
    register_policy_loss,
)
from .registry import Registry

__all__ = [
    "REFLECTED_SUFFIX",
    "AdvantageOutput",
    "AdvantageParams",
    "advantage_estimator_names",
    "equal_reward_rule_names",
    "get_advantage_estimator",
    "grpo_advantages",
    "register_advantage",
    "tapo_advantages",
    "CONSTRUCTED_PART",
    "NUM_PARTS",
    "ORIGINAL_PART",
    "GlobalCounts",
    "aggregation_names",
    "combination_names",
    "local_counts",
    "micro_batch_loss",
    "register_aggregation",
    "register_combination",
    "token_coefficients",
    "get_kl_estimator",
    "kl_estimator_names",
    "register_kl",
    "token_logprobs_and_entropy",
    "PolicyLossOutput",
    "PolicyLossParams",
    "get_policy_loss",
    "masked_mean",
    "policy_loss_names",
    "ppo_clip_loss",
    "register_policy_loss",
    "Registry",
]
