"""From a step's selected pairs to constructed training samples (docs/method.md §Construction and parsing,
§Verification, §Training sample).

The trainer's flow, one batch per stage::

    sel = select_pairs(rewards, group_index, n_pos=.., n_neg=.., m_max=.., rng=rng)
    reqs = build_requests(sel.pairs, questions, texts, template=tpl,
                          budget_tokens=cfg.max_prompt_tokens, count_tokens=count)
    outputs = <generate all reqs.prompts in ONE call of the rollout engine>
    parsed = parse_outputs(reqs, outputs)                     # unparsable dropped, counted
    r_ref = <grade [c.reconstruction for c in parsed.items] against the answers of
             [p.group for p in parsed.pairs], same reward function, one batch>
    result = assemble(parsed, r_ref, prompt_ids=.., texts=.., encode=.., eos_id=..,
                      construction=.., prefix=.., keep_failed=.., selection=sel, requests=reqs)
    result.samples, result.stats.metrics()

Indexing conventions: ``questions`` and ``prompt_ids`` are indexed by ``Pair.group``
(a list or a dict); ``texts`` and ``response_ids`` by sample index (``Pair.neg`` /
``Pair.pos``) into the flat rollout batch. Ids are unpadded (no pad tokens; a trailing
EOS in a response is harmless).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence, Union

from .fidelity import REFLECTION_MARKERS, find_reflection, prefix_fidelity
from .parsing import ParsedConstruction, parse_construction
from .prompt import DEFAULT_CONSTRUCTION_TEMPLATE, render_construction_prompt, validate_template
from .selection import Pair, SelectionResult
from .splice import incremental_token_texts, splice_prefix

IndexedStr = Union[Sequence[str], Mapping[int, str]]
IndexedIds = Union[Sequence[Sequence[int]], Mapping[int, Sequence[int]]]


@dataclass
class ConstructionRequests:
    prompts: list[str]   # construction prompts (user-message content), aligned with ``pairs``
    pairs: list[Pair]    # the pairs to construct
    skipped: list[Pair] = field(default_factory=list)  # over the construction context budget

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


@dataclass
class ParsedBatch:
    pairs: list[Pair]                   # pairs whose output parsed, aligned with ``items``
    items: list[ParsedConstruction]
    n_outputs: int                      # outputs received (= construction requests)
    unparsable: list[Pair] = field(default_factory=list)

    @property
    def n_parsed(self) -> int:
        return len(self.items)


@dataclass
class ConstructedSample:
    group: int                 # the question (original group index)
    prompt_ids: list[int]      # the question exactly as rendered for the rollout ([] without encode)
    response_ids: list[int]    # the reconstruction's tokens (or the spliced ones) + EOS ([] without encode)
    reward: float              # r_ref
    pair: Pair
    analysis: str
    reconstruction: str        # as generated (before any splice)
    prefix_fidelity: float
    spliced_tokens: int = 0    # leading response tokens copied verbatim from y⁻ (prefix: splice)
    prefix_tokens: int = 0     # leading response tokens before the reflection point (y⁻'s re-typed part)


@dataclass
class ConstructionStats:
    """Counts and sums of one step on one rank; :meth:`add_to` says how they combine over ranks."""

    n_groups: int = 0
    n_candidates: int = 0
    n_pairs: int = 0
    n_skipped_long: int = 0
    n_requests: int = 0
    n_parsed: int = 0
    reward_sum: float = 0.0     # over parsed (graded) constructions
    fidelity_sum: float = 0.0   # over parsed constructions
    n_samples: int = 0
    n_tokens: int = 0           # response tokens of the constructed samples, EOS included
    n_dropped_failed: int = 0

    def add_to(self, m) -> None:
        """``tapo/...`` scalars into a :class:`tapo_ds.metrics.StepMetrics`: counts add up over ranks; a rate
        or mean whose denominator sums to 0 is left out (not 0, not NaN)."""
        m.sum("tapo/pairs", self.n_pairs)
        m.sum("tapo/skipped_long", self.n_skipped_long)
        m.sum("tapo/constructed_samples", self.n_samples)
        m.sum("tapo/constructed_tokens", self.n_tokens)
        m.sum("tapo/dropped_failed", self.n_dropped_failed)
        m.mean("tapo/selected_frac", self.n_candidates, self.n_groups, if_empty=None)
        m.mean("tapo/parse_success", self.n_parsed, self.n_requests, if_empty=None)
        m.mean("tapo/construction_acc", self.reward_sum, self.n_parsed, if_empty=None)
        m.mean("tapo/prefix_fidelity", self.fidelity_sum, self.n_parsed, if_empty=None)

@dataclass
class AssemblyResult:
    samples: list[ConstructedSample]
    stats: ConstructionStats


def build_requests(
    pairs: Sequence[Pair],
    questions: IndexedStr,
    texts: IndexedStr,
    *,
    template: str = DEFAULT_CONSTRUCTION_TEMPLATE,
    budget_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> ConstructionRequests:
    """Render one construction prompt per pair; skip pairs whose prompt exceeds the budget.

    ``count_tokens(prompt)`` should count what will actually be fed to the model (chat
    template applied). ``budget_tokens=None`` disables the check.
    """
    validate_template(template)
    if budget_tokens is not None and count_tokens is None:
        raise ValueError("budget_tokens is set but count_tokens is not")
    out = ConstructionRequests(prompts=[], pairs=[])
    for pair in pairs:
        prompt = render_construction_prompt(questions[pair.group], texts[pair.neg],
                                            texts[pair.pos], template)
        if budget_tokens is not None and count_tokens(prompt) > budget_tokens:
            out.skipped.append(pair)
            continue
        out.prompts.append(prompt)
        out.pairs.append(pair)
    return out


def parse_outputs(requests: ConstructionRequests, outputs: Sequence[str]) -> ParsedBatch:
    """Parse the generated constructions (aligned with ``requests.prompts``); drop unparsable ones."""
    if len(outputs) != len(requests.pairs):
        raise ValueError(f"got {len(outputs)} construction outputs for "
                         f"{len(requests.pairs)} requests")
    batch = ParsedBatch(pairs=[], items=[], n_outputs=len(outputs))
    for pair, text in zip(requests.pairs, outputs):
        parsed = parse_construction(text)
        if parsed is None:
            batch.unparsable.append(pair)
        else:
            batch.pairs.append(pair)
            batch.items.append(parsed)
    return batch


def assemble(
    parsed: ParsedBatch,
    rewards: Sequence[float],
    *,
    texts: IndexedStr,
    prompt_ids: IndexedIds | None = None,
    encode: Callable[[str], list[int]] | None = None,
    eos_id: int | None = None,
    construction: Literal["micro", "full"] = "micro",
    prefix: Literal["regenerate", "splice"] = "regenerate",
    keep_failed: bool = True,
    markers: Sequence[str] = REFLECTION_MARKERS,
    response_ids: IndexedIds | None = None,
    decode: Callable[[list[int]], str] | None = None,
    selection: SelectionResult | None = None,
    requests: ConstructionRequests | None = None,
) -> AssemblyResult:
    """Turn graded constructions into training samples.

    ``rewards[i]`` is r_ref of ``parsed.items[i]``. A construction with r_ref <= 0 is kept
    as a negative unless ``keep_failed=False`` (the paper's "w/o Negative"). The response
    is ``encode(reconstruction) + [eos_id]``; with ``construction="micro"`` and
    ``prefix="splice"`` it is the spliced ids + EOS instead, which needs ``response_ids``
    (y⁻'s rollout token ids) and ``decode``. ``construction="full"`` never splices.
    Without ``encode`` the samples are texts only (no ids; the cold-start builder's rows).
    ``selection`` and ``requests`` only feed the stats.
    """
    if construction not in ("micro", "full"):
        raise ValueError(f"construction must be 'micro' or 'full', got {construction!r}")
    if prefix not in ("regenerate", "splice"):
        raise ValueError(f"prefix must be 'regenerate' or 'splice', got {prefix!r}")
    if len(rewards) != len(parsed.items):
        raise ValueError(f"got {len(rewards)} rewards for {len(parsed.items)} parsed constructions")
    do_splice = construction == "micro" and prefix == "splice"
    if do_splice and (response_ids is None or decode is None or encode is None):
        raise ValueError("prefix='splice' needs response_ids, decode and encode")
    if encode is not None and (prompt_ids is None or eos_id is None):
        raise ValueError("token ids need prompt_ids and eos_id")

    stats = ConstructionStats(n_requests=parsed.n_outputs, n_parsed=parsed.n_parsed)
    if selection is not None:
        stats.n_groups, stats.n_candidates = selection.n_groups, selection.n_candidates
        stats.n_pairs = len(selection.pairs)
    elif requests is not None:
        stats.n_pairs = len(requests.pairs) + requests.n_skipped
    else:
        stats.n_pairs = parsed.n_outputs
    if requests is not None:
        stats.n_skipped_long = requests.n_skipped

    samples: list[ConstructedSample] = []
    for pair, item, reward in zip(parsed.pairs, parsed.items, rewards):
        reward = float(reward)
        wrong = texts[pair.neg]
        fidelity = prefix_fidelity(item.reconstruction, wrong, markers)
        stats.reward_sum += reward
        stats.fidelity_sum += fidelity
        if reward <= 0 and not keep_failed:
            stats.n_dropped_failed += 1
            continue
        kept, ids, question_ids = 0, [], []
        if encode is not None and do_splice:
            y_ids = list(response_ids[pair.neg])
            spliced = splice_prefix(item.reconstruction, y_ids,
                                    incremental_token_texts(y_ids, decode), encode,
                                    markers=markers)
            ids, kept = spliced.response_ids + [int(eos_id)], spliced.n_kept
        elif encode is not None:
            ids = list(encode(item.reconstruction)) + [int(eos_id)]
        pre_tokens = 0
        if encode is not None:
            question_ids = list(prompt_ids[pair.group])
            if construction == "micro":
                pre_tokens = _tokens_before_reflection(ids, item.reconstruction, wrong, markers, encode, decode)
        samples.append(ConstructedSample(
            group=pair.group, prompt_ids=question_ids, response_ids=ids,
            reward=reward, pair=pair, analysis=item.analysis,
            reconstruction=item.reconstruction, prefix_fidelity=fidelity, spliced_tokens=kept,
            prefix_tokens=pre_tokens))
        stats.n_tokens += len(ids)
    stats.n_samples = len(samples)
    return AssemblyResult(samples=samples, stats=stats)


def _tokens_before_reflection(ids: Sequence[int], reconstruction: str, wrong: str, markers: Sequence[str],
                              encode: Callable[[str], list[int]],
                              decode: Callable[[list[int]], str] | None) -> int:
    """How many leading tokens of ``ids`` (a reconstruction's response, re-typed or spliced) lie wholly
    before its reflection point: y⁻'s part. A token that straddles the point counts as after it."""
    if decode is None:
        pos = find_reflection(reconstruction, markers, wrong=wrong)
        return len(encode(reconstruction[:pos])) if pos else 0
    pieces = incremental_token_texts(list(ids), decode)
    pos = find_reflection("".join(pieces), markers, wrong=wrong)
    n, end = 0, 0
    for piece in pieces if pos else ():
        end += len(piece)
        if end > pos:
            break
        n += 1
    return n
