"""Difficulty-aware Candidate Selection (DCS), docs/method.md §DCS.

A question (group) is a candidate iff it has at least ``n_pos`` right answers and at
least ``n_neg`` wrong ones. For each candidate, up to ``m_max`` wrong answers are drawn
uniformly at random without replacement, and each is paired with a right sibling of the
same group drawn uniformly at random, independently per pair (so with replacement).

Right means reward > 0; wrong means reward <= 0, which for the binary reward of the
paper is exactly reward = 0 (a negative shaping reward, if one is ever used, counts as
wrong rather than as neither).

The result is deterministic given the ``random.Random`` passed in: groups are visited
in ascending group id, samples of a group in ascending sample index, and the random
draws are made in that order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class Pair:
    """A (wrong, right) pair of one question; ``neg`` and ``pos`` index the flat rollout batch."""

    group: int
    neg: int
    pos: int


@dataclass
class SelectionResult:
    pairs: list[Pair]
    n_groups: int
    n_candidates: int
    candidate_groups: list[int] = field(default_factory=list)


def select_pairs(
    rewards: Sequence[float],
    group_index: Sequence[int],
    *,
    n_pos: int,
    n_neg: int,
    m_max: int,
    rng: random.Random,
) -> SelectionResult:
    """Select candidate questions and build their (wrong, right) pairs.

    ``rewards[i]`` and ``group_index[i]`` describe sample ``i`` of the flat rollout batch;
    samples of one group need not be contiguous. Pairs never cross groups.
    """
    if len(rewards) != len(group_index):
        raise ValueError(
            f"rewards has {len(rewards)} entries but group_index has {len(group_index)}")
    for name, value in (("n_pos", n_pos), ("n_neg", n_neg), ("m_max", m_max)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    members: dict[int, tuple[list[int], list[int]]] = {}
    for i, (r, g) in enumerate(zip(rewards, group_index)):
        pos, neg = members.setdefault(int(g), ([], []))
        (pos if float(r) > 0 else neg).append(i)

    pairs: list[Pair] = []
    candidates: list[int] = []
    for g in sorted(members):
        pos, neg = members[g]
        if len(pos) < n_pos or len(neg) < n_neg:
            continue
        candidates.append(g)
        chosen = sorted(rng.sample(neg, min(m_max, len(neg))))
        for j in chosen:
            pairs.append(Pair(group=g, neg=j, pos=rng.choice(pos)))
    return SelectionResult(pairs=pairs, n_groups=len(members), n_candidates=len(candidates),
                           candidate_groups=candidates)
