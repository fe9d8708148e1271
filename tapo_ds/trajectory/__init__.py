"""TAPO's trajectory module: candidate selection, the construction prompt, parsing,
prefix fidelity and splice, assembly of constructed samples, OTS weights.

Pure functions over strings, token lists, tensors and dataclasses: no DeepSpeed, no
transformers. Tokenization and generation come in as plain callables or results.

Choices (see docs/method.md §Choices) that live here, with their config keys:

- DCS (selection): a candidate has >= ``tapo.n_pos`` right and >= ``tapo.n_neg`` wrong answers
  (wrong = reward <= 0); up to ``tapo.m_max`` wrong answers drawn uniformly without replacement,
  each paired with a right sibling drawn uniformly per pair; seeded by ``seed``, rank and step.
- Construction prompt (prompt): our own wording of the paper's goals, one built-in per
  ``tapo.construction`` (``micro`` | ``full``), replaceable by a file (``tapo.template``); pairs
  whose prompt exceeds ``tapo.max_prompt_tokens`` are skipped and counted (assembly).
- Constructor (backends): ``tapo.constructor: policy`` (the method) or a registered backend,
  e.g. ``synthetic_oracle`` with ``tapo.oracle_accuracy`` (an experiment beyond the paper).
- Parsing: the last complete ``<reconstruction>`` block, an unclosed one read to the end;
  unparsable outputs are dropped and counted.
- Training sample (assembly): the rollout's question prompt + the reconstruction + EOS, the
  analysis dropped; failed constructions kept unless ``tapo.keep_failed_constructions: false``.
- Prefix (fidelity, splice): ``tapo.prefix: regenerate`` (the paper) or ``splice`` (ours); the
  reflection markers are the fixed ``REFLECTION_MARKERS``.
- OTS (ots): full-vocabulary entropy of the pre-update policy, weights detached, clamped to
  [``tapo.ots_w_min``, ``tapo.ots_w_max``]; off with ``tapo.ots: false``.
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
from .fidelity import REFLECTION_MARKERS, find_reflection, prefix_fidelity, reflects, split_at_reflection
from .ots import OTS, SampleWeights, loss_prefix, ots_weights, prefix_push
from .parsing import ParsedConstruction, format_construction, parse_construction
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
    "REFLECTION_MARKERS", "find_reflection", "prefix_fidelity", "reflects", "split_at_reflection",
    "OTS", "SampleWeights", "loss_prefix", "ots_weights", "prefix_push",
    "ParsedConstruction", "format_construction", "parse_construction",
    "BUILTIN_TEMPLATES", "DEFAULT_CONSTRUCTION_TEMPLATE", "FULL_RECONSTRUCTION_TEMPLATE",
    "load_template", "render_construction_prompt", "validate_template",
    "Pair", "SelectionResult", "select_pairs",
    "SpliceResult", "align_prefix", "incremental_token_texts", "splice_prefix",
]
