"""Parsing a construction output into its ``<analysis>`` and ``<reconstruction>`` parts.

Rules (tags are matched case-insensitively and may carry inner whitespace, ``< reconstruction >``):

* reconstruction: the LAST complete ``<reconstruction>...</reconstruction>`` block (the
  model's final word, when it rewrote its answer); if no block is closed, the text after
  the last ``<reconstruction>`` up to the end of the output (a missing closing tag, e.g.
  a generation cut at EOS), with any trailing special tokens such as ``<|im_end|>`` removed.
* analysis: the first ``<analysis>``, up to the first ``</analysis>`` or ``<reconstruction>``
  after it, whichever comes first (so a missing ``</analysis>`` is fine); ``""`` when the
  output has no ``<analysis>`` (the analysis is never trained on, docs/method.md §Training sample).
* Text outside the tags is ignored; both parts are stripped of surrounding whitespace.
* ``None`` (unparsable: the caller drops it and counts it) when there is no
  ``<reconstruction>`` tag or the reconstruction is empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REC_OPEN = re.compile(r"<\s*reconstruction\s*>", re.IGNORECASE)
_REC_CLOSE = re.compile(r"<\s*/\s*reconstruction\s*>", re.IGNORECASE)
_ANA_OPEN = re.compile(r"<\s*analysis\s*>", re.IGNORECASE)
_ANA_CLOSE = re.compile(r"<\s*/\s*analysis\s*>", re.IGNORECASE)
# A special token left at the very end by a decode that kept them: <|im_end|>,
# <|endoftext|>, <|eot_id|>, </s>, <eos>, <end_of_turn>.
_SPECIAL_AT_END = re.compile(r"(?:<\|[^<>|\s]{1,40}\|>|</s>|<eos>|<end_of_turn>)\Z", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedConstruction:
    analysis: str
    reconstruction: str
    closed: bool = True  # False: ``</reconstruction>`` was missing, taken to the end of the text


def _strip_special_tail(text: str) -> str:
    while True:
        text = text.rstrip()
        m = _SPECIAL_AT_END.search(text, max(0, len(text) - 64))
        if m is None:
            return text
        text = text[:m.start()]


def _reconstruction(text: str) -> tuple[str, bool] | None:
    # Reconstruction tags in order; a complete block is an opening tag whose next
    # reconstruction tag is a closing one.
    tags = sorted([(m.start(), m.end(), True) for m in _REC_OPEN.finditer(text)]
                  + [(m.start(), m.end(), False) for m in _REC_CLOSE.finditer(text)])
    last_block = None
    for (_, o_end, is_open), (c_start, _, next_open) in zip(tags, tags[1:]):
        if is_open and not next_open:
            last_block = (o_end, c_start)
    if last_block is not None:
        return text[last_block[0]:last_block[1]], True
    opens = [t for t in tags if t[2]]
    if not opens:
        return None
    return _strip_special_tail(text[opens[-1][1]:]), False


def _analysis(text: str) -> str:
    start = _ANA_OPEN.search(text)
    if start is None:
        return ""
    end = len(text)
    for pattern in (_ANA_CLOSE, _REC_OPEN):
        m = pattern.search(text, start.end())
        if m is not None:
            end = min(end, m.start())
    return text[start.end():end].strip()


def format_construction(analysis: str, reconstruction: str) -> str:
    """The output format the parser reads, with nothing around the tags."""
    return f"<analysis>{analysis}</analysis><reconstruction>{reconstruction}</reconstruction>"


def parse_construction(text: str) -> ParsedConstruction | None:
    found = _reconstruction(text)
    if found is None:
        return None
    body, closed = found
    body = body.strip()
    if not body:
        return None
    return ParsedConstruction(analysis=_analysis(text), reconstruction=body, closed=closed)
