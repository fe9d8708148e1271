"""The construction prompt (docs/method.md §Construction prompt): the one place where its text lives.

A template is plain text with three placeholders, ``{question}``, ``{wrong}`` and
``{right}``. Everything else is literal, braces included, so a template may (and the
built-ins do) contain LaTeX such as ``\\boxed{...}``, and the inputs may contain any
braces at all. Substitution is a single pass over the template: text coming from an
input is never scanned again, so an answer that happens to contain ``{right}`` stays as
it is. This is deliberately not ``str.format`` (which breaks on ``\\boxed{}``). The three
exact sequences ``{question}``, ``{wrong}``, ``{right}`` are the only reserved text of a
template (so a template must not write, say, ``\\boxed{right}`` literally).

The rendered string is the content of the user message; applying the model's chat
template is the caller's job (``count_tokens`` for the budget should count the prompt
the way it will be generated from, chat template included).
"""

from __future__ import annotations

import re
from pathlib import Path

PLACEHOLDERS = ("question", "wrong", "right")
_PLACEHOLDER_RE = re.compile(r"\{(question|wrong|right)\}")

DEFAULT_CONSTRUCTION_TEMPLATE = r"""You are a math reasoning auditor. You are given a math problem, an incorrect response to it and a correct response to it. Your task is to turn the incorrect response into a reasoning trajectory that notices its own mistake and recovers from it.

Goals:
1. Locate the first critical mistake in the incorrect response: the earliest step that makes its final answer wrong. Say where it is and name its type (for example: arithmetic error, algebraic manipulation error, misread condition, wrong formula or theorem, invalid logical step, missing case).
2. Keep the original reasoning of the incorrect response exactly as it is written, word for word, up to and including that mistake. Right after the mistake, move naturally into a short reflection that starts with "Wait, let me double-check", find what went wrong, correct it and continue the reasoning to the correct final answer. Drop everything the incorrect response wrote after the mistake.
3. Imitate the writing style of the incorrect response: the same voice, notation, level of detail and formatting, so that the reflection and the correction read as if the same author wrote them. Use the correct response only to know where the reasoning must go; do not copy it and never mention it, this analysis or these instructions inside the reconstruction.
4. Follow the output format exactly: first the analysis, then the reconstruction, which ends with the final answer in the form "Final Answer: \boxed{...}". Write nothing after </reconstruction>.

Output format:
<analysis>
Where the first critical mistake is, what type of mistake it is, and why it is wrong.
</analysis>
<reconstruction>
The incorrect response up to and including the mistake, then "Wait, let me double-check ...", the correction and the rest of the solution.
Final Answer: \boxed{...}
</reconstruction>

## Problem
{question}

## Incorrect response
{wrong}

## Correct response
{right}
"""

FULL_RECONSTRUCTION_TEMPLATE = r"""You are a math reasoning auditor. You are given a math problem, an incorrect response to it and a correct response to it. Your task is to write a new, correct solution to the problem.

Goals:
1. Locate the first critical mistake in the incorrect response: the earliest step that makes its final answer wrong. Say where it is and name its type (for example: arithmetic error, algebraic manipulation error, misread condition, wrong formula or theorem, invalid logical step, missing case).
2. Then write a complete solution from the beginning that avoids that mistake and reaches the correct final answer. Do not keep any part of the incorrect response and do not write a reflection or a correction of it: the solution must read as a fresh, self-contained solution.
3. Imitate the writing style of the incorrect response: the same voice, notation, level of detail and formatting. Use the correct response only to know where the reasoning must go; do not copy it and never mention it, this analysis or these instructions inside the reconstruction.
4. Follow the output format exactly: first the analysis, then the reconstruction, which ends with the final answer in the form "Final Answer: \boxed{...}". Write nothing after </reconstruction>.

Output format:
<analysis>
Where the first critical mistake is, what type of mistake it is, and why it is wrong.
</analysis>
<reconstruction>
A complete solution written from the beginning.
Final Answer: \boxed{...}
</reconstruction>

## Problem
{question}

## Incorrect response
{wrong}

## Correct response
{right}
"""

BUILTIN_TEMPLATES = {"micro": DEFAULT_CONSTRUCTION_TEMPLATE, "full": FULL_RECONSTRUCTION_TEMPLATE}


def validate_template(template: str, source: str = "template") -> str:
    """Return ``template`` unchanged, or raise ValueError naming the missing placeholders."""
    found = set(_PLACEHOLDER_RE.findall(template))
    missing = [p for p in PLACEHOLDERS if p not in found]
    if missing:
        names = ", ".join("{" + p + "}" for p in missing)
        raise ValueError(f"{source}: construction template is missing placeholder(s) {names}")
    return template


def load_template(path_or_name: str) -> str:
    """``"micro"`` / ``"full"``: the built-ins; anything else: a UTF-8 text file to read."""
    if path_or_name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[path_or_name]
    path = Path(path_or_name)
    if not path.is_file():
        raise FileNotFoundError(
            f"construction template {path_or_name!r}: not a file, nor one of "
            f"{sorted(BUILTIN_TEMPLATES)}")
    return validate_template(path.read_text(encoding="utf-8"), source=str(path))


def render_construction_prompt(question: str, wrong: str, right: str,
                               template: str = DEFAULT_CONSTRUCTION_TEMPLATE) -> str:
    """Fill the template in one pass; inputs are stripped of surrounding whitespace."""
    validate_template(template)
    values = {"question": question.strip(), "wrong": wrong.strip(), "right": right.strip()}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)
