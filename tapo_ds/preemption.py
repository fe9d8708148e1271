"""SIGTERM/SIGINT during training: stop at the next step boundary with a checkpoint; a second
signal exits at once.

The deepspeed launcher answers a signal by sending SIGTERM to every worker, and a terminal's
Ctrl-C or a cluster's preemption signal reaches the workers directly as well: copies of one event
that arrive within ``SAME_EVENT_S`` of the first count as that one signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_EVENT_S = 2.0


class StopRequest:
    """Installs the handlers while entered (main thread only); ``signum`` is the first signal seen."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self._first_at = signum, now
            print(f"{name} received: stopping after the current step with a checkpoint "
                  f"(send it again to exit at once without one)", file=sys.stderr, flush=True)
            return
        if now - self._first_at < SAME_EVENT_S:
            return
        print(f"{name} received again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
        os._exit(128 + signum)
