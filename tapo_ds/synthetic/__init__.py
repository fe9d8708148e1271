"""The synthetic task of the miniature (issue 5): multi-step integer arithmetic written as
numbered steps, realistic wrong solutions, the rule-based constructor, and its cold-start mix.

    python -m tapo_ds.synthetic make-data --out data/synthetic --train 2000 --test 200 --seed 0
"""

from .constructor import Diagnosis, analysis_text, construct, diagnose, rule_constructor
from .errors import ERROR_KINDS, CorruptionError, WrongSolution, corrupt, random_wrong_solution
from .mix import DEFAULT_MIX, MixResult, build_synthetic_mix, mix_counts, synthetic_grader
from .task import (
    PROMPT_TEMPLATE,
    SYNTHETIC_CONSTRUCTION_TEMPLATE,
    SYNTHETIC_FULL_TEMPLATE,
    SYNTHETIC_TEMPLATES,
    Problem,
    Step,
    generate_dataset,
    generate_problems,
    parse_problem,
    parse_step,
    render_prompt,
    sample_problem,
    split_of,
)

__all__ = [
    "DEFAULT_MIX", "MixResult", "build_synthetic_mix", "mix_counts", "synthetic_grader",
    "Diagnosis", "analysis_text", "construct", "diagnose", "rule_constructor",
    "ERROR_KINDS", "CorruptionError", "WrongSolution", "corrupt", "random_wrong_solution",
    "PROMPT_TEMPLATE", "SYNTHETIC_CONSTRUCTION_TEMPLATE", "SYNTHETIC_FULL_TEMPLATE",
    "SYNTHETIC_TEMPLATES", "Problem", "Step", "generate_dataset", "generate_problems",
    "parse_problem", "parse_step", "render_prompt", "sample_problem", "split_of",
]
