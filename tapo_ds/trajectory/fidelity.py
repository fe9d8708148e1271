"""The reflection point of a reconstruction and how faithfully its prefix re-types y⁻
(docs/method.md §Prefix fidelity and splice).

A micro-reflective reconstruction is ``pre + post``: ``pre`` is the wrong answer y⁻
re-typed up to its first critical mistake, ``post`` starts at the reflection ("Wait, let
me double-check ...") and carries the correction.

Reflection point: the earliest occurrence of any marker of ``markers`` (case-sensitive
substring match) — except that, when y⁻ is given, an occurrence is skipped when its whole
line (through its newline, or to the end of both texts) lies inside the exact common
prefix of the reconstruction and y⁻: that line is y⁻'s own reflection, copied. A marker
whose line departs from y⁻ before the line ends is the inserted reflection, even when it
starts like y⁻'s own (a policy that already writes "Wait, let me double-check step 2: ..."
gets a constructed "Wait, let me double-check step 3: ..." at the same place). With no
marker, ``pre = ""`` and ``post = reconstruction``: the reflection point is unknown and
``prefix: splice`` leaves the reconstruction as it is.

Prefix fidelity: the length of the common prefix of ``pre`` and y⁻ as a fraction of the
length of ``pre`` (characters; both compared without leading whitespace, ``pre`` also
without trailing whitespace). Two edge cases: a reconstruction that opens with the
reflection (``pre`` empty: the mistake is in the very first step and nothing of y⁻ is
re-typed) scores 1.0, since there is nothing that could have drifted; one without any
marker scores 0.0 (no reflection point, so no prefix to measure: not a micro-reflective
reconstruction). Where the reflection sits is a separate question (the synthetic task's
probe checks it against the first wrong step).
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


def reflects(text: str, markers: Sequence[str] = REFLECTION_MARKERS) -> bool:
    """Whether ``text`` (a policy's answer) holds a reflection: any marker of ``markers``."""
    return any(m and m in text for m in markers)


def _lead(text: str) -> int:
    return len(text) - len(text.lstrip())


def common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def copied_prefix_len(reconstruction: str, wrong: str) -> int:
    """End (in ``reconstruction``) of its exact common prefix with ``wrong``, leading whitespace ignored."""
    r0, w0 = _lead(reconstruction), _lead(wrong)
    return r0 + common_prefix_len(reconstruction[r0:], wrong[w0:])


def _copied_line(reconstruction: str, pos: int, copied: int, wrong_ends: bool) -> bool:
    """Whether the line of ``reconstruction`` holding ``pos`` lies wholly inside its copied prefix."""
    end = reconstruction.find("\n", pos)
    if end >= 0:
        return end < copied  # the newline itself was copied
    # the last line: copied when y⁻'s line ends there too
    return copied == len(reconstruction) and wrong_ends


def find_reflection(reconstruction: str, markers: Sequence[str] = REFLECTION_MARKERS,
                    *, wrong: str | None = None) -> int | None:
    """Character index of the reflection point, or None when no marker occurs."""
    copied, wrong_ends = 0, False
    if wrong is not None:
        copied = copied_prefix_len(reconstruction, wrong)
        # what y⁻ writes after the copied part: does its line end there?
        rest = wrong[_lead(wrong) + copied - _lead(reconstruction):]
        wrong_ends = not rest or rest[0] in "\r\n"
    best: int | None = None
    for marker in markers:
        if not marker:
            continue
        pos = reconstruction.find(marker)
        while pos >= 0 and pos < copied and _copied_line(reconstruction, pos, copied, wrong_ends):
            pos = reconstruction.find(marker, pos + 1)
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
    pos = find_reflection(reconstruction, markers, wrong=wrong)
    if pos is None:
        return 0.0
    core = reconstruction[:pos].strip()
    if not core:
        return 1.0  # the reflection opens the reconstruction: nothing re-typed, nothing drifted
    return common_prefix_len(core, wrong.lstrip()) / len(core)
