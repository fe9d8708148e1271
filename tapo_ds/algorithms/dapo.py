"""DAPO's options (Yu et al., 2025, arXiv 2503.14476), each off by default.

- Dynamic sampling (``rollout.dynamic_sampling``): a group whose rewards are all equal has advantage
  0 under group normalisation and teaches nothing; such groups are dropped and more questions are
  sampled until the step holds B informative groups or ``rollout.dynamic_sampling_max_rounds``
  extra rollout calls have been made.
- Soft overlong punishment (``reward.overlong_window``, ``reward.overlong_penalty``): a response
  longer than ``max_new_tokens - window`` loses reward linearly, down to ``-penalty`` at the limit.
- Truncated responses masked out of the loss (``algorithm.mask_truncated``): a response cut at
  ``max_new_tokens`` has no final answer, so its reward says little about its tokens.
- Clip-higher (``algorithm.clip_high`` > ``algorithm.clip_low``) lives in the policy loss.
"""

from __future__ import annotations

from typing import Sequence


def overlong_penalty(length: int, max_new_tokens: int, window: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_new_tokens - window`` tokens, then linear
    down to ``-penalty`` at ``max_new_tokens`` (and beyond). ``window`` 0: no penalty."""
    if window < 0 or window > max_new_tokens:
        raise ValueError(f"overlong window must be in [0, max_new_tokens={max_new_tokens}], got {window}")
    if window == 0:
        return 0.0
    free = max_new_tokens - window
    if length <= free:
        return 0.0
    return -penalty * min(1.0, (length - free) / window)


def informative(rewards: Sequence[float]) -> bool:
    """Whether a group's rewards differ (a group of equal rewards has advantage 0 everywhere)."""
    return len(rewards) > 0 and max(rewards) != min(rewards)
