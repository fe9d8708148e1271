"""The reflection point of a reconstruction and how faithfully its prefix re-types y⁻ (TAPO.md §4).

A micro-reflective reconstruction is ``pre + post``: ``pre`` is the wrong answer y⁻
re-typed up to its first critical mistake, ``post`` starts at the reflection ("Wait, let
me double-check ...") and carries the correction.

Reflection point: the earliest occurrence of any marker of ``markers`` (case-sensitive
substring match) — except that, when y⁻ is given, an occurrence lying entirely inside the
exact common prefix of the reconstruction and y⁻ is skipped: it is y⁻'s own "Wait," that
was copied, not the inserted reflection. With no marker, ``pre = ""`` and
``post = reconstruction``: the reflection point is unknown, so the prefix fidelity is 0
and ``prefix: splice`` leaves the reconstruction as it is.

Prefix fidelity: the length of the common prefix of ``pre`` and y⁻ as a fraction of the
length of ``pre`` (characters; both compared without leading whitespace, ``pre`` also
without trailing whitespace); 0 when ``pre`` is empty.
"""

from __future__ import annotations

import os
from typing import Sequence

REFLECTION_MARKERS: tuple[str, ...] = (
    "Wait, let me double-check",
    "Wait, let me double check",
    "Let me double-check",
    "Let me double check",
    "Hmm, wait",
    "But wait",
    "Wait,",
    "Wait.",
    "Wait!",
)


def _lead(text: str) -> int:
    return len(text) - len(text.lstrip())


def common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def copied_prefix_len(reconstruction: str, wrong: str) -> int:
    """End (in ``reconstruction``) of its exact common prefix with ``wrong``, leading whitespace ignored."""
    r0, w0 = _lead(reconstruction), _lead(wrong)
    return r0 + common_prefix_len(reconstruction[r0:], wrong[w0:])


def find_reflection(reconstruction: str, markers: Sequence[str] = REFLECTION_MARKERS,
                    *, wrong: str | None = None) -> int | None:
    """Character index of the reflection point, or None when no marker occurs."""
    copied = copied_prefix_len(reconstruction, wrong) if wrong is not None else 0
    best: int | None = None
    for marker in markers:
        if not marker:
            continue
        pos = reconstruction.find(marker, max(0, copied - len(marker) + 1))
        if pos >= 0 and (best is None or pos < best):
            best = pos
    return best


def split_at_reflection(reconstruction: str, markers: Sequence[str] = REFLECTION_MARKERS,
                        *, wrong: str | None = None) -> tuple[str, str]:
    """``(pre, post)`` with ``pre + post == reconstruction``; ``("", reconstruction)`` without a marker."""
    pos = find_reflection(reconstruction, markers, wrong=wrong)
    if pos is None:
        return "", reconstruction
    return reconstruction[:pos], reconstruction[pos:]


def prefix_fidelity(reconstruction: str, wrong: str,
                    markers: Sequence[str] = REFLECTION_MARKERS) -> float:
    pre, _ = split_at_reflection(reconstruction, markers, wrong=wrong)
    core = pre.strip()
    if not core:
        return 0.0
    return common_prefix_len(core, wrong.lstrip()) / len(core)
