"""Construction backends, by name (``tapo.constructor``): what writes the step's constructions.

A backend turns the step's construction requests (a :class:`ConstructionJob`) into one output text
per request, in the format the parser reads (``<analysis>...</analysis><reconstruction>...
</reconstruction>``); what follows generation (parse, verify, assemble) is one code path whoever
wrote the texts.

- ``policy`` (the method): the policy samples from the rendered construction prompts.
- ``synthetic_oracle`` (``tapo_ds.synthetic.oracle``): the synthetic task's rule constructor with
  its correction spoiled on purpose with probability ``1 - tapo.oracle_accuracy``, to study TAPO's
  mechanism as a function of the constructor's accuracy, apart from the model's ability to construct.

A backend module registers itself with :func:`register_backend`; the modules of the built-in
backends outside this package are imported on the first lookup (not here: they may import this one).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

from tapo_ds.algorithms.registry import Registry

from .assembly import ConstructionRequests

# Imported on the first lookup so that their backends are registered.
BUILTIN_BACKEND_MODULES: tuple[str, ...] = ("tapo_ds.synthetic.oracle",)


@dataclass(frozen=True)
class ConstructionJob:
    """The step's construction requests, aligned: request i is (questions[i], wrong[i], right[i])."""

    questions: list[str]
    wrong: list[str]
    right: list[str]
    prompt_ids: list[list[int]]  # the chat-rendered construction prompt of each request, tokenised
    step: int
    rank: int

    @classmethod
    def of(cls, requests: ConstructionRequests, problems: Sequence[str], texts: Sequence[str],
           prompt_ids: list[list[int]], *, step: int, rank: int) -> "ConstructionJob":
        pairs = requests.pairs
        return cls(questions=[problems[p.group] for p in pairs], wrong=[texts[p.neg] for p in pairs],
                   right=[texts[p.pos] for p in pairs], prompt_ids=prompt_ids, step=step, rank=rank)

    def __len__(self) -> int:
        return len(self.questions)


@dataclass(frozen=True)
class BackendContext:
    """What a backend may use: the policy's generate call and the tapo settings that concern it."""

    generate: Callable[[list[list[int]]], list[str]]  # prompt token ids -> output texts, one call
    construction: str  # micro | full
    seed: int
    oracle_accuracy: float


Backend = Callable[[ConstructionJob], list[str]]
BackendFactory = Callable[[BackendContext], Backend]

_BACKENDS: Registry[BackendFactory] = Registry("construction backend")


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    return _BACKENDS.register(name)


def _import_builtins() -> None:
    for module in BUILTIN_BACKEND_MODULES:
        importlib.import_module(module)


def backend_names() -> list[str]:
    _import_builtins()
    return _BACKENDS.names()


def build_backend(name: str, context: BackendContext) -> Backend:
    _import_builtins()
    return _BACKENDS.get(name)(context)


@register_backend("policy")
def policy_backend(context: BackendContext) -> Backend:
    def backend(job: ConstructionJob) -> list[str]:
        return context.generate(job.prompt_ids)

    return backend
