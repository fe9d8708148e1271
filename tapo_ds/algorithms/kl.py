"""Per-token KL estimators between the policy and a reference model (Schulman's k1/k3)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .registry import Registry

KLFn = Callable[[Tensor, Tensor], Tensor]

_KL: Registry[KLFn] = Registry("KL estimator")


def register_kl(name: str) -> Callable[[KLFn], KLFn]:
    return _KL.register(name)


def get_kl_estimator(name: str) -> KLFn:
    return _KL.get(name)


def kl_estimator_names() -> list[str]:
    return _KL.names()


@register_kl("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


@register_kl("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    # Non-negative and low variance, but exp() makes it explode where the two models
    # disagree wildly; clamp as verl does so one token cannot dominate the step.
    log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)
