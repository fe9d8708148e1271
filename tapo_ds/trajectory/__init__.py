"""TAPO's trajectory module: candidate selection, the construction prompt, parsing,
prefix fidelity and splice, assembly of constructed samples, OTS weights.

Pure functions over strings, token lists, tensors and dataclasses: no DeepSpeed, no
transformers. Tokenization and generation come in as plain callables or results.
"""

from .assembly import (
    AssemblyResult,
    ConstructedSample,
    ConstructionRequests,
    ConstructionStats,
    ParsedBatch,
    assemble,
    build_requests,
    parse_outputs,
)
from .fidelity import REFLECTION_MARKERS, find_reflection, prefix_fidelity, split_at_reflection
from .ots import entropy_from_logits, ots_metrics, ots_token_weights, ots_weight_sums, ots_weights
from .parsing import ParsedConstruction, parse_construction
from .prompt import (
    BUILTIN_TEMPLATES,
    DEFAULT_CONSTRUCTION_TEMPLATE,
    FULL_RECONSTRUCTION_TEMPLATE,
    load_template,
    render_construction_prompt,
    validate_template,
)
from .selection import Pair, SelectionResult, select_pairs
from .splice import SpliceResult, align_prefix, incremental_token_texts, splice_prefix

__all__ = [
    "AssemblyResult", "ConstructedSample", "ConstructionRequests", "ConstructionStats",
    "ParsedBatch", "assemble", "build_requests", "parse_outputs",
    "REFLECTION_MARKERS", "find_reflection", "prefix_fidelity", "split_at_reflection",
    "entropy_from_logits", "ots_metrics", "ots_token_weights", "ots_weight_sums", "ots_weights",
    "ParsedConstruction", "parse_construction",
    "BUILTIN_TEMPLATES", "DEFAULT_CONSTRUCTION_TEMPLATE", "FULL_RECONSTRUCTION_TEMPLATE",
    "load_template", "render_construction_prompt", "validate_template",
    "Pair", "SelectionResult", "select_pairs",
    "SpliceResult", "align_prefix", "incremental_token_texts", "splice_prefix",
]
