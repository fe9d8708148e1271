"""Sample-level metrics for the math benchmarks: pass@k, avg@n, maj@n, no-box rate.

Pure functions over per-sample results; grading itself (answer extraction and
equivalence) is `tapo_ds.reward`'s job and is passed in where needed, so this module
imports nothing of the trainer and can be tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import comb

PASS_KS = (1, 2, 3, 4, 5)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    The probability that at least one of k samples drawn without replacement from the n
    is correct (Chen et al., 2021). Exact integer arithmetic, so n = 80 is no problem.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_vote(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    equivalent: Callable[[str, str], bool],
) -> float:
    """maj@n credit for one problem: is the most frequent answer the correct one?

    `answers[i]` is sample i's extracted answer (None or blank: no answer, which does
    not vote) and `correct[i]` whether it matches the reference. Equivalent answers are one
    vote: the correct ones form one cluster (they all equal the reference); the wrong
    ones are clustered by exact string and then by `equivalent` on one representative
    per cluster. A tie between the correct cluster and t-1 others scores 1/t, the
    expected credit of a random tie-break, so the result does not depend on sample
    order. Clustering is skipped when the outcome is already decided.
    """
    if len(answers) != len(correct):
        raise ValueError("majority_vote: answers and correct differ in length")
    voters = [(a.strip(), ok) for a, ok in zip(answers, correct) if a is not None and a.strip()]
    n_correct = sum(1 for _, ok in voters if ok)
    wrong = [a for a, ok in voters if not ok]
    if n_correct == 0:
        return 0.0
    if n_correct > len(wrong):
        return 1.0

    counts: dict[str, int] = {}
    for a in wrong:
        counts[a] = counts.get(a, 0) + 1
    clusters: list[list] = []  # [representative, size]
    for answer, size in counts.items():
        for cluster in clusters:
            if equivalent(answer, cluster[0]):
                cluster[1] += size
                break
        else:
            clusters.append([answer, size])

    largest_wrong = max(size for _, size in clusters)
    if n_correct > largest_wrong:
        return 1.0
    if n_correct < largest_wrong:
        return 0.0
    tied = 1 + sum(1 for _, size in clusters if size == n_correct)
    return 1.0 / tied


def summarize(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    equivalent: Callable[[str, str], bool],
    ks: Sequence[int] = PASS_KS,
) -> dict[str, float]:
    """All per-problem metrics from its n graded samples.

    pass@k for every k in `ks` with k <= n (a k above n has no estimate and is left
    out), avg@n (mean correctness, the pass@1 estimate), maj@n and no_box (fraction of
    samples whose answer is None, i.e. without a complete box; they count as wrong).
    """
    n = len(correct)
    if n == 0:
        raise ValueError("summarize: no samples")
    c = sum(bool(x) for x in correct)
    out = {f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n}
    out["avg@n"] = c / n
    out["maj@n"] = majority_vote(answers, correct, equivalent)
    out["no_box"] = sum(a is None for a in answers) / n
    return out
