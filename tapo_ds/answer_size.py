"""A cheap structural check that refuses answers too costly to hand to math-verify.

math-verify (sympy underneath) evaluates integer powers, factorials and binomials exactly
and its LaTeX parser is exponential in the nesting of bare groups: ``9^{9^{9^9}}`` asks for
a 370-million-digit integer, ``1000000!`` for 5.5 million digits, and eight nested ``{``
or ``(`` already take seconds to parse. The grading pool's kill timeout bounds all of them,
but only after occupying a worker for the whole timeout. :func:`refusal_reason` reads the
answer's structure in linear time, in the parent process, and refuses it before any
worker sees it.

Bounds, measured on math-verify 0.9 (a worker grades an answer inside them in well
under a second; legitimate competition answers stay far inside):

- nesting depth of bare groups (``()``, ``[]``, ``\\{\\}``, ``{}`` that is no command's
  argument) at most MAX_BARE_NESTING, of all groups at most MAX_NESTING;
- an upper bound on the number of decimal digits of the largest integer an exact
  evaluation needs, at most MAX_VALUE_DIGITS. ``2^{2025}`` (610 digits),
  ``2^{25} \\cdot 26!`` (35), ``\\binom{2025}{2}`` pass; power towers of non-trivial
  numbers, factorials of six-digit numbers and huge digit strings in exponents do not.

The digit bound is built bottom-up over the LaTeX tokens without knowing operator
precedence: a run of terms counts the sum of their digits (an upper bound for sums,
products and quotients alike), ``a^b`` counts ``digits(a) * value(b)``, ``n!`` counts
``log10(n!)``, ``\\binom{n}{k}`` ``min(n log10 2, k digits(n))``. Small integers are kept
exactly, so a bound does not compound through a tower of small numbers; an unknown symbol
counts as a one-digit number (``x^{2025}`` passes, ``x^{x^{x^{9}}}`` does not).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Deepest nesting of bare groups (parentheses, brackets, braces that are no command's
# argument): math-verify's parser takes ~0.7 s on 6 nested bare braces or 8 parentheses and
# ~4 s on 8 braces; legitimate answers (\left( \frac{\sqrt{3}}{2} \right), intervals, sets
# of tuples) nest at most 2 or 3 of them.
MAX_BARE_NESTING = 6
# Deepest nesting of all groups: arguments are cheap to parse (16 nested \frac{1}{( ~0.5 s,
# 32 nested \sqrt{ ~0.4 s), and continued fractions or nested radicals may go 5 or 6 deep.
MAX_NESTING = 16
# Largest exact integer worth evaluating: sympy compares 10^5-digit integers in well under
# a second; the longest answer form in competition data (2^{2025}) has 610 digits.
MAX_VALUE_DIGITS = 100_000

_TOKENS = re.compile(r"\\[a-zA-Z]+|\\.|\d+(?:\.\d+)?|\*\*|\s+|.", re.DOTALL)
_OPEN = {"{", "(", "[", "\\{"}
_CLOSE = {"}", ")", "]", "\\}"}
# Commands that combine their arguments (\frac{a}{b}: the digits of both) ...
_TWO_ARGS = {"\\frac", "\\dfrac", "\\tfrac", "\\cfrac"}
_BINOMS = {"\\binom", "\\dbinom", "\\tbinom"}
_ONE_ARG = {"\\sqrt", "\\text", "\\textrm", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname",
            "\\overline", "\\bar", "\\hat", "\\vec", "\\mathbb"}
# ... and tokens that are operators, spacing or delimiter decoration: they add no digits.
_NEUTRAL = {"\\cdot", "\\times", "\\div", "\\pm", "\\mp", "\\left", "\\right", "\\big", "\\Big", "\\bigg",
            "\\Bigg", "\\,", "\\;", "\\:", "\\!", "\\ ", "\\quad", "\\qquad", "\\displaystyle", "\\\\",
            "+", "-", "*", "/", "=", ",", ";", ":", "<", ">", "|", ".", "&", "'", "$", "~"}
_POWERS = {"^", "**"}
# Tokens after which a brace opens an argument, besides commands (\frac{1}{2}: "}" then "{").
_ARG_LEADS = {"^", "_", "}", "]"}
_LOG10_2 = math.log10(2)
_EXACT_LIMIT = 10**18  # keep integers exact up to here, bounds beyond


@dataclass(frozen=True)
class _Size:
    """log10(1 + largest integer an exact evaluation needs), and the value if a small integer."""

    digits: float
    exact: int | None = None

    @property
    def value_bound(self) -> float:
        """An upper bound on the absolute value (of an exponent, a factorial's argument)."""
        if self.exact is not None:
            return float(abs(self.exact))
        return math.inf if self.digits > 300 else 10.0**self.digits

    @staticmethod
    def of_int(n: int) -> _Size:
        return _Size(math.log10(abs(n) + 1), n if abs(n) <= _EXACT_LIMIT else None)


_SYMBOL = _Size(1.0)
_NOTHING = _Size(0.0)


def _power(base: _Size, exponent: _Size) -> _Size:
    if base.exact is not None and abs(base.exact) <= 1:
        return base  # 0, 1, -1 to any power stay that small
    e = exponent.value_bound
    if base.exact is not None and exponent.exact is not None and 0 <= e <= 64:
        return _Size.of_int(base.exact ** int(e)) if base.digits * e <= 18 else _Size(base.digits * e)
    return _Size(base.digits * e if base.digits else 0.0)


def _factorial(n: _Size) -> _Size:
    v = n.value_bound
    if n.exact is not None and 0 <= n.exact <= 20:
        return _Size.of_int(math.factorial(n.exact))
    return _Size(math.inf if v > 1e300 else math.lgamma(v + 1) / math.log(10) + 1)


def _binom(n: _Size, k: _Size) -> _Size:
    if n.exact is not None and k.exact is not None and 0 <= k.exact <= n.exact <= 10**6:
        return _Size.of_int(math.comb(n.exact, k.exact)) if n.exact <= 64 else _Size(
            (math.lgamma(n.exact + 1) - math.lgamma(k.exact + 1) - math.lgamma(n.exact - k.exact + 1))
            / math.log(10) + 1)
    # C(n, k) <= 2^n and C(n, k) <= n^k
    return _Size(min(n.value_bound * _LOG10_2 + 1, k.value_bound * n.digits if n.digits else 0.0))


def _sum(parts: list[_Size]) -> _Size:
    if len(parts) == 1:
        return parts[0]
    return _Size(sum(p.digits for p in parts))


def _number(token: str) -> _Size:
    if "." in token:
        return _Size(float(len(token) - 1))  # a decimal is an integer over a power of ten
    if len(token) <= 18:
        return _Size.of_int(int(token))
    return _Size(float(len(token.lstrip("0")) or 1))


def _factorials(size: _Size, count: int) -> _Size:
    for _ in range(count):
        size = _factorial(size)
    return size


def _fold(chain: list[_Size]) -> _Size:
    """a^b^c may be read as a^(b^c) or (a^b)^c: count the larger."""
    right = chain[-1]
    for s in reversed(chain[:-1]):
        right = _power(s, right)
    left = chain[0]
    for s in chain[1:]:
        left = _power(left, s)
    return max(right, left, key=lambda s: s.digits)


class _Reader:
    """Recursive descent over the tokens; recursion follows group nesting, which
    :func:`nesting_depths` bounds before a reader is made."""

    def __init__(self, tokens: list[str]) -> None:
        self.toks = [t for t in tokens if not t.isspace()]
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def whole(self) -> _Size:
        parts = [self.sequence()]
        while self.peek() is not None:  # a stray closer ended the sequence early: read on
            parts.append(self.sequence())
        return _sum(parts)

    def sequence(self) -> _Size:
        """Terms up to the closer of the current group (consumed) or the end."""
        parts: list[_Size] = []
        choose_left: _Size | None = None  # {n \choose k}
        while (tok := self.peek()) is not None:
            if tok in _CLOSE:
                self.take()
                break
            if tok == "\\choose":
                self.take()
                choose_left, parts = _sum(parts or [_NOTHING]), []
            elif tok in _NEUTRAL:
                self.take()
            else:
                parts.append(self.term())
        total = _sum(parts or [_NOTHING])
        return total if choose_left is None else _binom(choose_left, total)

    def term(self) -> _Size:
        """Operands joined by powers, each with its factorials and subscript."""
        chain = [self.operand()]
        while self.peek() in _POWERS:
            self.take()
            chain.append(self.operand())
        *head, (last, bangs) = chain
        sizes = [_factorials(s, n) for s, n in head]
        # 2^{20}! is (2^{20})! in LaTeX but 2^(20!) in a plain reading: count the larger.
        inner = _fold(sizes + [_factorials(last, bangs)])
        outer = _factorials(_fold(sizes + [last]), bangs)
        return max(inner, outer, key=lambda s: s.digits)

    def operand(self) -> tuple[_Size, int]:
        """A primary and the number of factorials after it (n!! is (n!)! to math-verify)."""
        size, bangs = self.primary(), 0
        while (tok := self.peek()) in ("!", "_"):
            self.take()
            if tok == "!":
                bangs += 1
            else:
                self.primary()  # a subscript names a symbol: its digits do not count
        return size, bangs

    def primary(self) -> _Size:
        tok = self.peek()
        if tok is None or tok in _CLOSE:
            return _NOTHING  # a missing operand ("2^}"): the closer is the group's
        self.take()
        if tok in _OPEN:
            return self.sequence()
        if tok[0].isdigit():
            return _number(tok)
        if tok in _TWO_ARGS:
            return _sum([self.argument(), self.argument()])
        if tok in _BINOMS:
            return _binom(self.argument(), self.argument())
        if tok in _ONE_ARG:
            index = self.argument() if tok == "\\sqrt" and self.peek() == "[" else _NOTHING
            return _sum([index, self.argument()])
        if tok in _NEUTRAL or tok in _POWERS or tok == "!":
            return _NOTHING  # a stray operator where a value was expected
        return _SYMBOL

    def argument(self) -> _Size:
        tok = self.peek()
        if tok is None or tok in _CLOSE:
            return _NOTHING
        self.take()
        if tok in _OPEN:
            return self.sequence()
        # \frac12: one token per argument; a command is not expanded further
        return _number(tok) if tok[0].isdigit() else _SYMBOL


def nesting_depths(tokens: list[str]) -> tuple[int, int]:
    """(deepest nesting of all groups, of bare groups). A brace right after a command, ``^``,
    ``_``, ``}`` or ``]`` is an argument (``\\frac{1}{\\sqrt{2}}``), cheap to parse; other
    braces, parentheses, brackets and ``\\{`` are bare. Any closer closes any opener
    (intervals such as ``(1, 2]``)."""
    stack: list[bool] = []  # per open group: bare?
    deepest = bare = deepest_bare = 0
    prev = ""
    for tok in tokens:
        if tok.isspace():
            continue
        if tok in _OPEN:
            is_bare = tok != "{" or not (prev in _ARG_LEADS or prev[:1] == "\\" and prev[1:2].isalpha())
            stack.append(is_bare)
            bare += is_bare
            deepest, deepest_bare = max(deepest, len(stack)), max(deepest_bare, bare)
        elif tok in _CLOSE and stack:
            bare -= stack.pop()
        prev = tok
    return deepest, deepest_bare


def value_digits(answer: str) -> float:
    """Upper bound on the decimal digits of the largest integer an exact evaluation of
    ``answer`` needs (inf if unbounded). Recursion follows the nesting: call it on answers
    within the nesting bounds (as :func:`refusal_reason` does)."""
    return _Reader(_TOKENS.findall(answer)).whole().digits


def refusal_reason(answer: str) -> str | None:
    """Why ``answer`` is refused without being parsed, or None if it may be graded."""
    tokens = _TOKENS.findall(answer)
    depth, bare = nesting_depths(tokens)
    if depth > MAX_NESTING:
        return f"nesting depth {depth} > {MAX_NESTING}"
    if bare > MAX_BARE_NESTING:
        return f"nesting depth of bare groups {bare} > {MAX_BARE_NESTING}"
    digits = value_digits(answer)
    if digits > MAX_VALUE_DIGITS:
        shown = "unbounded" if math.isinf(digits) else f"~{digits:.3g}"
        return f"value needs {shown} digits > {MAX_VALUE_DIGITS}"
    return None
