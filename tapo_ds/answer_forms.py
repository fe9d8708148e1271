"""Plain forms of answers: percent and degree marks removed before math-verify sees them.

MATH-style data writes "50\\%" for fifty percent while the reference (or the model) often
writes ``50``; angles come as ``30^\\circ``, ``30°`` or ``30`` alike. math-verify fails on
several of these spellings: ``%`` starts a LaTeX comment (``50%`` and ``50\\%`` do not parse
at all), ``°`` is unknown and ``25^\\circ C`` parses as ``25*c``. The grader therefore
compares the plain forms of both sides.

Choices, kept deliberately narrow:

- A mark is removed only where it ends a value: it follows a digit, letter, ``}``, ``)``
  or ``]`` and is followed by the end of the answer or a separator (``,``, ``;``, ``)``,
  ``]``, ``\\}``, ``\\right``, ``$``). So ``30^\\circ, 60^\\circ`` becomes ``30, 60``,
  while a ``%`` in the middle of an expression is left to math-verify.
- Percent means "the number written before it", not a hundredth: ``50\\%`` equals ``50``
  and does not equal ``0.5`` (math-verify does not equate them either; references in
  MATH-style data write the percentage number, so equating with the fraction would
  make a wrong ``0.5`` count for the answer "50").
- Degrees are not converted to radians: ``30^\\circ`` equals ``30``, not ``\\frac{\\pi}{6}``
  (math-verify itself drops ``^\\circ`` the same way).
- A temperature unit right after a degree mark (``25^\\circ C``, ``25°F``,
  ``25^{\\circ}\\text{C}``) goes with it, as math-verify already drops ``\\text{ cm}``.

Linear time in the answer's length (one regex scan; each mark's lookahead stops at the
next non-space character). Imports neither torch nor math-verify.
"""

from __future__ import annotations

import re

# \text{...}-like wrappers in which a mark may be written.
_TEXT_OPEN = r"\\(?:text|textrm|mathrm|mbox|rm)\s*\{\s*"
_NOT_LETTER = r"(?![a-zA-Z])"
_PERCENT = r"\\%|%|\\percent" + _NOT_LETTER + "|" + _TEXT_OPEN + r"\\?%\s*\}"
_DEGREE_SIGN = (r"\^\s*(?:\{\s*(?:\\circ|\\degree)\s*\}|\\circ" + _NOT_LETTER + r"|\\degree" + _NOT_LETTER + ")"
                r"|°|\\degree" + _NOT_LETTER + r"|\\circ" + _NOT_LETTER)
_TEMPERATURE = r"(?:\s*(?:[CF]" + _NOT_LETTER + "|" + _TEXT_OPEN + r"[CF]\s*\}))?"
_DEGREE_WORD = _TEXT_OPEN + r"degrees?\s*\}"
# Where a value ends: the end of the answer or a list/interval/set separator.
_VALUE_END = r"(?=\s*(?:$|[,;)\]$]|\\\}|\\right" + _NOT_LETTER + r"|\\rangle))"
_MARK = re.compile("(?:" + _PERCENT + "|(?:" + _DEGREE_SIGN + ")" + _TEMPERATURE + "|" + _DEGREE_WORD + ")"
                   + _VALUE_END)
# LaTeX spacing that may sit between a number and its mark ("50\,\%", "30\ ^\circ").
_SPACING = ("\\,", "\\;", "\\:", "\\!", "\\ ", "~")


def _strip_spacing(text: str) -> str:
    while True:
        for sp in _SPACING:
            if text.endswith(sp):
                text = text[: -len(sp)]
                break
        else:
            stripped = text.rstrip()
            if stripped == text:
                return text
            text = stripped


def _ends_a_value(char: str) -> bool:
    return char.isalnum() or char in "})]"


def plain_form(answer: str) -> str:
    """``answer`` without the percent and degree marks that end its values.

    ``50\\%``, ``50 %``, ``50%``, ``50\\,\\%``, ``30^\\circ``, ``30^{\\circ}``, ``30°``,
    ``30\\text{ degrees}``, ``25^\\circ C`` become ``50``/``30``/``25``; ``(10\\%, 20\\%]``
    becomes ``(10, 20]``; anything else is returned unchanged. See the module docstring
    for what is deliberately not equated (``50\\%`` and ``0.5``; degrees and radians).
    """
    pieces: list[str] = []
    pos = 0
    for m in _MARK.finditer(answer):
        head = _strip_spacing(answer[pos : m.start()])
        last = head[-1:] or (pieces[-1][-1:] if pieces else "")
        if not last or not _ends_a_value(last):
            continue  # a mark with no value before it stays for math-verify to judge
        pieces.append(head)
        pos = m.end()
    if not pieces:
        return answer
    pieces.append(answer[pos:])
    return "".join(pieces)
