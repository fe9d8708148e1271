"""The synthetic task of the miniature (issue 5): multi-step integer arithmetic written as
numbered steps, realistic wrong solutions, the rule-based constructor, and the cold-start
data builder's pure core.

    python -m tapo_ds.synthetic make-data --out data/synthetic --train 2000 --test 200 --seed 0
"""

from .coldstart import (
    DEFAULT_MIX,
    ColdStartResult,
    ColdStartStats,
    MixResult,
    build_coldstart,
    build_synthetic_mix,
    format_examples,
    math_equal_grader,
    mix_counts,
    pool_grader,
    synthetic_grader,
)
from .constructor import Diagnosis, analysis_text, construct, diagnose, format_construction, rule_constructor
from .errors import ERROR_KINDS, CorruptionError, WrongSolution, corrupt, random_wrong_solution
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
    read_jsonl,
    render_prompt,
    sample_problem,
    split_of,
    write_jsonl,
)

__all__ = [
    "DEFAULT_MIX", "ColdStartResult", "ColdStartStats", "MixResult", "build_coldstart",
    "build_synthetic_mix", "format_examples", "math_equal_grader", "mix_counts", "pool_grader",
    "synthetic_grader",
    "Diagnosis", "analysis_text", "construct", "diagnose", "format_construction", "rule_constructor",
    "ERROR_KINDS", "CorruptionError", "WrongSolution", "corrupt", "random_wrong_solution",
    "PROMPT_TEMPLATE", "SYNTHETIC_CONSTRUCTION_TEMPLATE", "SYNTHETIC_FULL_TEMPLATE",
    "SYNTHETIC_TEMPLATES", "Problem", "Step", "generate_dataset", "generate_problems",
    "parse_problem", "parse_step", "read_jsonl", "render_prompt", "sample_problem", "split_of",
    "write_jsonl",
]
