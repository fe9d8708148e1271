"""Forwards without gradient run on torch's own ``linear``, not ZeRO-3's replacement.

ZeRO-3 swaps ``torch.nn.functional.linear`` for ``zero3_linear_wrap`` process-wide (DeepSpeed's
``memory_efficient_linear``, on by default) and never swaps it back. Every linear layer of every model
in the process then goes through a Python ``autograd.Function``, including the plain inference copy the
rollout decodes with. The replacement only changes what the backward keeps, so a forward under
``no_grad`` gains nothing from it and pays its overhead on each call: measured in a quickstart GRPO
step on CPU, the rollout took 2.5-2.9 s with it and 1.7-1.9 s without (as under ZeRO-2), same samples.
"""

from __future__ import annotations

import contextlib

import torch

_TORCH_LINEAR = torch._C._nn.linear  # what torch.nn.functional.linear is before anything patches it


@contextlib.contextmanager
def plain_linear():
    """Inside: ``torch.nn.functional.linear`` is torch's own; outside: whatever it was. Only for code that
    builds no autograd graph (raises otherwise, since ZeRO-3's backward needs its replacement)."""
    if torch.is_grad_enabled():
        raise RuntimeError("plain_linear() is for forwards under torch.no_grad()")
    saved = torch.nn.functional.linear
    torch.nn.functional.linear = _TORCH_LINEAR
    try:
        yield
    finally:
        torch.nn.functional.linear = saved
