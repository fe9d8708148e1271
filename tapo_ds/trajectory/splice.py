"""``prefix: splice``: put y⁻'s exact tokens back in place of the re-typed prefix (an option of ours,
docs/method.md §Prefix fidelity and splice).

The policy re-types y⁻'s prefix inside the reconstruction and may drift from it. Splice
replaces that prefix by y⁻ itself, as token ids, up to the *matched point*:

1. Split the reconstruction at the reflection point (``fidelity.split_at_reflection``,
   markers copied from y⁻ skipped): ``pre`` (the re-typed prefix) and ``post``.
2. Align ``pre`` with y⁻ (``align_prefix``). The exact common prefix (leading whitespace
   ignored) is taken first; if ``pre`` goes on past it (drift), the rest of ``pre`` is
   aligned with ``difflib.SequenceMatcher`` over lines and sentences against the text of
   y⁻ that follows, within a window about as long as that rest (so the tail of ``pre``
   cannot be matched far beyond the mistake), keeping only matching blocks of at least
   ``min_match`` characters, then extended character by character into the partly
   re-typed segment. The matched point is ``(a_end, m)``: where the alignment ends in
   ``pre`` and in y⁻. If fewer than ``min_frac`` of the prefix's characters are aligned,
   the prefix is not recognisably a copy of y⁻ and nothing is spliced.
3. Snap ``m`` DOWN to a token boundary ``b`` of y⁻ (never inside a token, never after a
   token that only holds part of a multi-byte character) — y⁻'s tokens are
   ``wrong_token_ids`` with decoded texts ``wrong_token_texts`` (their concatenation is
   taken as y⁻'s text).
4. Response = ``wrong_token_ids[:k]`` (k tokens, exactly y⁻'s) + ``encode(y⁻[b:m] +
   pre[a_end:] + sep + post)``: the part of y⁻ between the boundary and the matched
   point, then what the model wrote after the matched point (the drifted tail of the
   prefix, so nothing of the mistake step is lost), then the reflection; ``sep`` is a
   newline, added only when neither side of the junction has whitespace.

With no reflection marker, or too little matched, the reconstruction is encoded unchanged.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Callable, Sequence

from .fidelity import REFLECTION_MARKERS, common_prefix_len, split_at_reflection

_SEGMENT_RE = re.compile(r"[^\n]*?(?:[.!?][ \t]+|\n+|$)")


@dataclass
class SpliceResult:
    response_ids: list[int]   # without EOS
    n_kept: int               # leading tokens taken verbatim from y⁻ (= wrong_token_ids[:n_kept])
    matched_frac: float       # aligned characters of the re-typed prefix / its length (stripped)
    text: str                 # the spliced response text (for logging)


def incremental_token_texts(token_ids: Sequence[int],
                            decode: Callable[[list[int]], str]) -> list[str]:
    """Per-token decoded texts whose concatenation is the decoded sequence.

    A token that ends inside a multi-byte character (byte-level BPE) gets ``""`` and the
    token completing the character gets all of it. Each token is decoded together with
    the token before it (and any pending partial ones) and credited with the difference,
    so tokenizers that drop the leading space of a lone token are handled too.
    """
    texts: list[str] = []
    prefix_offset = read_offset = 0
    ids = list(token_ids)
    for i in range(len(ids)):
        prefix_text = decode(ids[prefix_offset:read_offset])
        new_text = decode(ids[prefix_offset:i + 1])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            texts.append(new_text[len(prefix_text):])
            prefix_offset, read_offset = read_offset, i + 1
        else:
            texts.append("")
    return texts


def _segments(text: str) -> tuple[list[str], list[int]]:
    """Lines and sentences (a segment ends after a newline run, or after ``.!?`` followed
    by blanks) with their start offsets; the segments concatenate to ``text``."""
    found = [(m.group(), m.start()) for m in _SEGMENT_RE.finditer(text) if m.group()]
    return [c for c, _ in found], [s for _, s in found]


def align_prefix(pre: str, wrong: str, *, min_match: int = 8) -> tuple[int, int, int]:
    """``(a_end, m, matched)``: the matched point in ``pre`` and in ``wrong``, and how many
    characters of ``pre`` up to ``a_end`` are aligned with ``wrong``.

    Exact common prefix first (leading whitespace ignored). Past a drift, the rest of
    ``pre`` is aligned segment by segment (``difflib.SequenceMatcher`` over lines and
    sentences, which stays fast on long texts) against the text of ``wrong`` that
    follows, within a window about as long as that rest; matching blocks shorter than
    ``min_match`` characters are ignored; after the last block the exact common prefix is
    extended into the segment that was only partly re-typed (the mistake step).
    """
    p0 = len(pre) - len(pre.lstrip())
    w0 = len(wrong) - len(wrong.lstrip())
    cp = common_prefix_len(pre[p0:], wrong[w0:])
    a_end, m, matched = (p0 + cp, w0 + cp, cp) if cp else (0, 0, 0)
    rest = pre[a_end:]
    if not rest.strip():
        return a_end, m, matched
    window = wrong[m:m + len(rest) + max(256, len(rest) // 2)]
    a_segs, a_starts = _segments(rest)
    b_segs, b_starts = _segments(window)
    last = None
    for blk in SequenceMatcher(None, a_segs, b_segs, autojunk=False).get_matching_blocks():
        if blk.size == 0:
            continue
        a_from = a_starts[blk.a]
        a_to = a_starts[blk.a + blk.size] if blk.a + blk.size < len(a_starts) else len(rest)
        if a_to - a_from < min_match:
            continue
        b_to = b_starts[blk.b + blk.size] if blk.b + blk.size < len(b_starts) else len(window)
        matched += a_to - a_from
        last = (a_to, b_to)
    if last is not None:
        a_end, m = a_end + last[0], m + last[1]
        ext = common_prefix_len(pre[a_end:], wrong[m:])
        a_end, m, matched = a_end + ext, m + ext, matched + ext
    return a_end, m, matched


def splice_prefix(
    reconstruction: str,
    wrong_token_ids: Sequence[int],
    wrong_token_texts: Sequence[str],
    encode: Callable[[str], list[int]],
    *,
    markers: Sequence[str] = REFLECTION_MARKERS,
    min_match: int = 8,
    min_frac: float = 0.5,
) -> SpliceResult:
    if len(wrong_token_ids) != len(wrong_token_texts):
        raise ValueError(f"wrong_token_ids has {len(wrong_token_ids)} tokens but "
                         f"wrong_token_texts has {len(wrong_token_texts)} texts")
    wrong = "".join(wrong_token_texts)
    pre, post = split_at_reflection(reconstruction, markers, wrong=wrong)
    core = pre.strip()
    if not core:
        return SpliceResult(list(encode(reconstruction)), 0, 0.0, reconstruction)
    a_end, m, matched = align_prefix(pre, wrong, min_match=min_match)
    frac = min(1.0, matched / len(core))
    if m == 0 or matched < min_frac * len(core):
        # the prefix is not recognisably a copy of y⁻: leave it alone
        return SpliceResult(list(encode(reconstruction)), 0, frac, reconstruction)

    ends, total = [], 0
    for t in wrong_token_texts:
        total += len(t)
        ends.append(total)
    k = bisect.bisect_right(ends, m)
    while k > 0 and wrong_token_texts[k - 1] == "":
        k -= 1  # a token holding part of a character, or nothing: keep it with the next
    b = ends[k - 1] if k else 0

    head = wrong[b:m] + pre[a_end:]
    before = wrong[:b] + head
    sep = "" if (not before or before[-1].isspace() or not post or post[0].isspace()) else "\n"
    tail = head + sep + post
    ids = list(wrong_token_ids[:k]) + list(encode(tail))
    return SpliceResult(ids, k, frac, wrong[:b] + tail)
