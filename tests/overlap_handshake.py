"""Forces the overlap a test asserts instead of hoping the machine shows it.

Under overlap, batch N+1's forward is in flight while batch N is processed. Left alone, whether
N+1's forward is still running once N's processing begins is a race between the forward thread
and the scheduler thread: on loaded cores the scheduler may wake after a short forward has
already returned (CI saw it). `ProcessingHandshake` holds forward N+1, on the forward thread
right before it runs, until N's processing has begun, so the interval overlap is certain when
the loop overlaps and impossible to reach when it does not: a loop that processed N only after
N+1's forward returned would leave that forward waiting out `timeout_s` (`timed_out` names it).
"""
from __future__ import annotations

import threading

HANDSHAKE_TIMEOUT_S = 60.0   # bounds a hang only: a healthy overlap loop releases it at once


class ProcessingHandshake:
    def __init__(self, sched, timeout_s: float = HANDSHAKE_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.processing: dict[int, threading.Event] = {}   # forward_iter -> its processing began
        self.timed_out: list[int] = []                     # forwards that waited in vain
        self._lock = threading.Lock()
        launch, result = sched.executor.on_launch, sched.on_result

        def on_launch(forward_iter: int) -> None:          # the forward thread, before the forward
            if launch is not None:
                launch(forward_iter)
            if forward_iter > 1 and not self._event(forward_iter - 1).wait(self.timeout_s):
                self.timed_out.append(forward_iter)

        def on_result(batch) -> None:                      # the scheduler, as N's processing begins
            self._event(batch.forward_iter).set()
            result(batch)

        sched.executor.on_launch = on_launch
        sched.on_result = on_result

    def _event(self, forward_iter: int) -> threading.Event:
        with self._lock:
            return self.processing.setdefault(forward_iter, threading.Event())
