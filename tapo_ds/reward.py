"""Binary verifiable reward: the last ``\\boxed{}`` of a response against the reference.

r = 1 iff the content of the response's last ``\\boxed{...}`` (or ``\\fbox{...}``) is
mathematically equivalent to the gold answer according to math-verify, else 0.

Grading runs in separate worker processes because math-verify (sympy underneath) can
take unbounded time or memory on adversarial answers: ``\\boxed{9^{9^{9^9}}}`` makes
sympy compute 9^(9^9), a 370-million-digit integer, inside CPython's C code; a few
hundred nested braces make the LaTeX parser take seconds, and comparing sets nested
20 deep takes over 30 s. math-verify's own timeout is ``signal.alarm``, which (a) only
works in the main thread and (b) only fires between bytecodes, so it cannot stop a long
C-level computation. The only reliable bound is to
kill the process, so the parent enforces a hard per-answer timeout, kills and respawns
a worker that overruns, and counts the answer as wrong. That timeout is the last line of
defence: before any worker sees a pair, the parent refuses answers whose structure makes
them astronomically costly (power towers, huge factorials, deep nesting; see
``tapo_ds.answer_size``), counted wrong at once, and removes the percent and degree marks
math-verify stumbles on (``50\\%`` equals ``50``, ``30°`` equals ``30``; see
``tapo_ds.answer_forms``).

This module must not import torch or deepspeed: the eval package imports it too.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_conns
from typing import Sequence

from tapo_ds.answer_forms import plain_form
from tapo_ds.answer_size import refusal_reason

log = logging.getLogger(__name__)

# A response without a box is graded as a bare answer only if it is this short: a long
# unboxed response is a missing answer, not an answer.
MAX_BARE_CHARS = 200
# Longer answers (after box extraction) are counted as errors without being parsed: the
# parser's regexes and sympy are super-linear, and no real answer is this long.
MAX_ANSWER_CHARS = 10_000
# A worker imports math-verify (and the parent's __main__, as any spawn child) and warms
# up before it reports ready; this only bounds a worker that never comes up.
STARTUP_TIMEOUT = 120.0
# Consecutive failed worker starts before grade() gives up (a broken environment).
MAX_START_FAILURES = 3

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Backslash escapes (\{, \}, \\) are consumed as pairs so they never count as braces.
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)


# --------------------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    Braces are matched with nesting; escaped braces (``\\{``, ``\\}``) do not count. The
    box that starts last wins (so ``\\boxed{x=\\boxed{3}}`` gives ``3``). Returns None if
    there is no box, or if the last box command is not followed by a balanced ``{...}``
    (a truncated response): an earlier box is then not used, since the model moved past it.
    Linear time: two ``rfind`` and one scan of the tail.
    """
    pos, cmd = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if pos < 0:
        return None
    i = pos + len(cmd)
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for m in _BRACE_TOKENS.finditer(text, i):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : m.start()]
    return None


def _answer_of(response: str, require_box: bool = False) -> tuple[str | None, bool]:
    """(answer to grade or None, whether the response has a box).

    A response that mentions a box command but has no complete box (unclosed) has no
    answer; a short response with no box command at all is taken as a bare answer,
    unless ``require_box`` (the training reward, docs/method.md §Reward: last box only).
    """
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed, True
    if require_box or any(c in response for c in _BOX_COMMANDS) or len(response) > MAX_BARE_CHARS:
        return None, False
    return response, False


def _gold_answer(gold: str) -> str:
    # Gold may be a full solution ending in a box; otherwise it is the answer itself
    # (no length rule: long golds such as matrices are legitimate).
    boxed = last_boxed(gold)
    return gold if boxed is None else boxed


# --------------------------------------------------------------------------- worker side


def _extraction_config():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # The answer is wrapped in \boxed{} (below), so the boxed pattern is tried first.
    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _parse(answer: str) -> list:
    from math_verify import parse

    # parsing_timeout=None: the signal-based timeout is off; the parent kills overruns.
    # raise_on_error=True: failures reach _worker_main and are counted, not swallowed.
    return parse("\\boxed{" + answer + "}", _extraction_config(), parsing_timeout=None,
                 raise_on_error=True)


def _judge(answer: str, gold: str) -> tuple[bool, str | None]:
    """(correct, error message or None). Runs inside a worker only (unbounded time)."""
    from math_verify import verify
    from sympy import Basic, MatrixBase

    gold_p, pred_p = _parse(gold), _parse(answer)
    # parse returns [sympy object, string fallback]; verify(gold_list, pred_list) is "any
    # pair matches". Pairs are compared one at a time so that an exception in one
    # comparison is recorded without hiding a later match.
    failure = None
    for g, p in itertools.product(gold_p, pred_p):
        try:
            if verify(g, p, timeout_seconds=None, raise_on_error=True):
                return True, None
        except Exception as e:  # sympy raises many types; each one is reported as an error
            failure = failure or f"verify: {type(e).__name__}: {str(e)[:200]}"
    if failure is None:
        for name, parsed in (("gold", gold_p), ("answer", pred_p)):
            if not any(isinstance(x, (Basic, MatrixBase)) for x in parsed):
                failure = f"unparseable {name}"
                break
    return False, failure


def _cap_memory(extra_mb: int) -> None:
    """Limit the worker's address space to its warmed-up size plus ``extra_mb``: a hostile
    answer (a huge power sympy decides to expand) then fails with MemoryError, counted as an
    error, instead of taking the machine's memory within its time limit. Linux only."""
    if extra_mb <= 0 or not os.path.exists("/proc/self/statm"):
        return
    import resource

    with open("/proc/self/statm") as fh:
        current = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = current + extra_mb * 2**20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main(conn, memory_mb: int = 0) -> None:
    """Worker loop: receive (answer, gold), send ("done", correct, error); None stops."""
    # Ctrl-C goes to the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # math-verify warns once that its timeout is disabled: intended, see module docstring.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Warm up (lazy imports, regex compilation, parser tables) before reporting ready, so
    # the per-answer timeout measures grading, not start-up.
    _judge("\\frac{1}{2}", "0.5")
    _cap_memory(memory_mb)
    conn.send(("ready",))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # parent gone
            return
        if task is None:
            return
        answer, gold = task
        try:
            ok, err = _judge(answer, gold)
        except Exception as e:  # reported to the parent, which counts it as an error
            ok, err = False, f"{type(e).__name__}: {str(e)[:200]}"
        conn.send(("done", ok, err))


# --------------------------------------------------------------------------- parent side


def _refused(answer: str, gold: str) -> bool:
    """Whether the pair is refused by the structural check (linear time, no worker)."""
    reason = refusal_reason(gold)
    if reason is not None:  # a reference no answer can match: the data needs fixing
        log.warning("reference refused unparsed (%s): %.80r", reason, gold)
        return True
    reason = refusal_reason(answer)
    if reason is not None:
        log.debug("answer refused unparsed (%s): %.80r", reason, answer)
        return True
    return False


@dataclass
class GradeResult:
    """Verdicts of one grade() call, in input order, with failure counts.

    ``errors`` counts answers that could not be graded cleanly (unparseable answer or gold,
    an exception, a crashed worker, an over-long answer, an empty gold); ``timeouts``
    answers killed at the time limit; ``refused`` answers (or golds) refused unparsed by the
    structural check of ``tapo_ds.answer_size``; ``no_box`` responses without a complete
    box. All of them are graded wrong.
    """

    correct: list[bool]
    timeouts: int = 0
    errors: int = 0
    no_box: int = 0
    refused: int = 0


class _Worker:
    """One worker process and the parent's view of it."""

    def __init__(self, ctx, memory_mb: int = 0) -> None:
        self.ctx = ctx
        self.memory_mb = memory_mb
        self.start()

    def start(self) -> None:
        ctx = self.ctx
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, self.memory_mb), daemon=True,
                                name="tapo-grader")
        self.proc.start()
        # Without closing our copy of the child's end, a dead worker would never show EOF.
        child.close()
        self.ready = False
        self.task: tuple[int, str] | None = None  # (index in the batch, answer) in flight
        self.deadline = time.monotonic() + STARTUP_TIMEOUT

    @property
    def waited_on(self) -> bool:
        return self.task is not None or not self.ready

    def stop(self, grace: float = 0.5) -> None:
        self.conn.close()
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM has no Python handler: it stops C code too
            self.proc.join(grace)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class GradingPool:
    """Persistent worker processes that grade (response, gold) pairs in parallel.

    Workers stay alive between grade() calls (a start costs ~1 s: interpreter, math-verify
    import, warm-up) and are started with ``spawn``: the trainer's process runs torch and
    DeepSpeed threads, which makes ``fork`` unsafe. Each answer gets a hard ``timeout``
    (seconds); an overrunning worker is killed and respawned in the background while the
    others keep grading. A pool belongs to the process that created it (not to forked
    children). grade() calls are serialised by a lock.

    As with any ``spawn`` child, each worker re-imports the parent's ``__main__`` module,
    so the entry script must keep its work under ``if __name__ == "__main__":`` (otherwise
    the workers die at start-up and grade() raises after MAX_START_FAILURES tries).
    """

    def __init__(self, num_workers: int = 2, timeout: float = 5.0, memory_mb: int = 2048) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.timeout = float(timeout)
        self._ctx = mp.get_context("spawn")
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._start_failures = 0
        self._closed = False
        # memory_mb: address space each worker may add after warm-up (0 = no cap).
        self._workers = [_Worker(self._ctx, memory_mb) for _ in range(num_workers)]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop all workers. Idempotent; a no-op in a forked copy of the owning process."""
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)  # polite stop for idle workers
            except OSError:
                pass  # already dead: stop() below reaps it
        end = time.monotonic() + 1.0  # one shared grace period, then stop() forces it
        for w in self._workers:
            w.proc.join(max(0.0, end - time.monotonic()))
            w.stop()
        self._workers = []

    def grade(self, pairs: Sequence[tuple[str, str]], timeout: float | None = None,
              require_box: bool = False) -> GradeResult:
        """Grade (response, gold) pairs; ``timeout`` overrides the pool's per-answer limit.

        ``require_box``: a response without a ``\\boxed{}`` is wrong without being parsed
        (the training reward); otherwise a short one is graded as a bare answer."""
        if self._closed:
            raise RuntimeError("GradingPool is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("GradingPool used in a forked child; create one per process")
        limit = self.timeout if timeout is None else float(timeout)
        result = GradeResult(correct=[False] * len(pairs))
        todo: deque[tuple[int, str, str]] = deque()
        for i, (response, gold) in enumerate(pairs):
            answer, has_box = _answer_of(str(response), require_box)
            result.no_box += not has_box
            if answer is None or not answer.strip():
                continue  # no answer given: wrong, and not a grading failure
            gold = _gold_answer(str(gold))
            if not gold.strip() or len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
                result.errors += 1
                continue
            answer, gold = plain_form(answer), plain_form(gold)
            if _refused(answer, gold):
                result.refused += 1
                continue
            todo.append((i, answer, gold))
        if not todo:
            return result
        with self._lock:
            try:
                self._run(todo, limit, result)
            except BaseException:
                # A late answer from this batch must not land in the next one.
                for w in self._workers:
                    if w.task is not None:
                        self._restart(w)
                raise
        return result

    # ---- internals

    def _run(self, todo: deque, limit: float, result: GradeResult) -> None:
        while todo or any(w.task is not None for w in self._workers):
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and todo:
                    i, answer, gold = todo.popleft()
                    try:
                        w.conn.send((answer, gold))
                    except OSError:  # died while idle: not this answer's fault, retry it
                        todo.appendleft((i, answer, gold))
                        self._restart(w)
                        continue
                    w.task, w.deadline = (i, answer), now + limit
            waited = [w for w in self._workers if w.waited_on]
            by_conn = {w.conn: w for w in waited}
            wait_s = max(0.0, min(w.deadline for w in waited) - now)
            for conn in wait_for_conns(list(by_conn), wait_s):
                self._receive(by_conn[conn], result)
            now = time.monotonic()
            for w in waited:
                if w.waited_on and w.deadline <= now:
                    if w.task is not None:
                        result.timeouts += 1
                        log.warning("grading timed out after %.2fs, worker restarted; answer: %.80r",
                                    limit, w.task[1])
                    else:
                        self._start_failed("did not start in time")
                    self._restart(w)

    def _receive(self, w: _Worker, result: GradeResult) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):  # the process died (segfault, OOM kill, ...)
            w.stop()  # reap it: its exit code says why
            code, task = w.proc.exitcode, w.task
            w.start()
            if task is not None:
                result.errors += 1
                log.warning("grading worker died (exit code %s), restarted; answer: %.80r",
                            code, task[1])
            else:
                self._start_failed(f"died during start-up (exit code {code})")
            return
        if msg[0] == "ready":
            w.ready = True
            self._start_failures = 0
            return
        _, ok, err = msg
        i, answer = w.task
        result.correct[i] = bool(ok)
        if err is not None:
            result.errors += 1
            log.debug("grading error (%s); answer: %.80r", err, answer)
        w.task = None

    @staticmethod
    def _restart(w: _Worker) -> None:
        w.stop()
        w.start()  # in place: callers hold references to the slot

    def _start_failed(self, why: str) -> None:
        self._start_failures += 1
        if self._start_failures >= MAX_START_FAILURES:
            raise RuntimeError(f"grading worker {why}, {self._start_failures} times in a row")
        log.warning("grading worker %s; retrying", why)


# --------------------------------------------------------------------------- one-off grading

# math_equal goes through a module-level pool too (1 worker, created on
# first use, closed at exit) rather than calling math-verify inline: inline, a hostile
# answer could hang the caller (lm-eval's process_results, the trainer) forever, since
# math-verify's signal timeout cannot interrupt sympy's C code and refuses to run off
# the main thread. The pool is re-created in a forked child, which must not share the
# parent's pipes.
_default_pool: GradingPool | None = None
_default_lock = threading.Lock()


def _get_default_pool() -> GradingPool:
    global _default_pool
    with _default_lock:
        pool = _default_pool
        if pool is None or pool.closed or pool._pid != os.getpid():
            pool = _default_pool = GradingPool(num_workers=1)
            atexit.register(pool.close)
        return pool


def math_equal(prediction: str, gold: str, timeout: float = 5.0) -> bool:
    """Whether ``prediction`` is equivalent to ``gold``, within ``timeout`` seconds.

    ``prediction`` is a whole response (its last box is graded; no complete box means
    wrong) or a bare answer (a string of at most MAX_BARE_CHARS with no box command).
    ``gold`` is an answer (``204``, ``\\frac{3}{4}``, ``(1, 2]``, ...) or a text whose last
    box holds it. Percent and degree marks ending a value are dropped on both sides first
    (``50\\%``, ``50 %`` and ``50`` are equal; ``50\\%`` and ``0.5`` are not; see
    ``tapo_ds.answer_forms``). A timeout, a grading failure or an answer refused by the
    structural check gives False. Thread-safe.
    """
    return _get_default_pool().grade([(prediction, gold)], timeout=timeout).correct[0]
