"""RL algorithm pieces as pure torch functions, each variant a registry entry by name."""

from .advantages import (
    REFLECTED_SUFFIX,
    AdvantageOutput,
    AdvantageParams,
    advantage_estimator_names,
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
    deepspeed_loss_scale,
    local_counts,
    micro_batch_loss,
    register_aggregation,
    token_coefficients,
)
from .kl import get_kl_estimator, kl_estimator_names, kl_penalty, register_kl
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
    "get_advantage_estimator",
    "grpo_advantages",
    "register_advantage",
    "tapo_advantages",
    "CONSTRUCTED_PART",
    "NUM_PARTS",
    "ORIGINAL_PART",
    "GlobalCounts",
    "aggregation_names",
    "deepspeed_loss_scale",
    "local_counts",
    "micro_batch_loss",
    "register_aggregation",
    "token_coefficients",
    "get_kl_estimator",
    "kl_estimator_names",
    "kl_penalty",
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
