"""Work that starts inside the rollout: a question's samples are graded as soon as all K have ended, and
what the grades call for (TAPO's construction prompts) joins the running decode in the slots finished
rows freed. The method is the same as with the phases one after another; only the schedule differs.

:class:`GradeThenFollow` is the :class:`tapo_ds.decode_loop.FollowUps` of such a decode. Grading runs in
one background thread (the grading pool's workers are processes; the thread mostly waits on their
pipes), so the decode does not stop for it; a grading error is raised in the decode, never swallowed.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

from deepspeed.runtime.rollout.base import SamplingConfig

from tapo_ds.lookup_draft import LookupDraft


class GradeThenFollow:
    """``grade(q, token_ids, truncated)`` runs in the background when question q's samples have ended;
    ``follow_up(q, graded)`` runs in the decoding thread with its result and returns the prompts to
    start for q (possibly none); ``lookup``: the follow-up rows verify prompt-lookup drafts."""

    def __init__(self, sampling: SamplingConfig, grade: Callable[[int, list[list[int]], list[bool]], Any],
                 follow_up: Callable[[int, Any], list[list[int]]], lookup: Optional[LookupDraft] = None):
        self.sampling, self.lookup = sampling, lookup
        self._grade, self._follow_up = grade, follow_up
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grade")
        self._pending: dict[int, Future] = {}
        self.started: list[int] = []  # the question of each follow-up row, in the order they joined
        self.wait_s = 0.0  # time the decode stood still waiting for grades (only when nothing else ran)

    def group_done(self, prompt: int, token_ids: list[list[int]], truncated: list[bool]) -> None:
        self._pending[prompt] = self._pool.submit(self._grade, prompt, token_ids, truncated)

    def ready(self, block: bool) -> list[list[int]]:
        prompts: list[list[int]] = []
        for q in sorted(self._pending):
            future = self._pending[q]
            if not (block or future.done()):
                continue
            t0 = time.perf_counter()
            graded = future.result()
            self.wait_s += time.perf_counter() - t0
            del self._pending[q]
            new = self._follow_up(q, graded)
            self.started += [q] * len(new)
            prompts += new
        return prompts

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "GradeThenFollow":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
