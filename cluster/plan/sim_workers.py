"""The simulated workers of `simulate.py`, each running the cluster's overlap loop.

The overlap loop (`runtime/base_scheduler.py`) reads its messages, launches the next batch and
only then waits for the running one. So in a busy worker:
- a message (a new request, a `decode_ready`, a landed KV) is read at the end of the step it
  arrived in, not when it arrives;
- the batch launched at that boundary runs after the one already queued: a request read while
  the worker is busy joins the step after next. An idle worker reads and launches at once.
And the handoff is the cluster's: decode reserves pages (when it reads the request) before
prefill may schedule it (`decode_ready`), and the first token reaches the client when decode
has read the landed KV and committed it, not when prefill sampled it.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from cluster.plan.costs import CostModel


class Clock:
    """The event queue: `at(t, fn)` runs fn at time t, in time order (ties in call order)."""

    def __init__(self):
        self.now, self._events, self._seq = 0.0, [], itertools.count()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def run(self) -> None:
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()


@dataclass
class SimRequest:
    arrival: float
    input_len: int
    output_len: int
    scheduled: int = 0                 # prompt tokens in launched chunks (unified)
    prefilled: int = 0                 # prompt tokens done (unified chunks)
    generated: int = 0                 # output tokens so far, the first included
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None

    @property
    def seq_len(self) -> int:
        return self.input_len + self.generated

    @property
    def ttft(self) -> float:
        return self.first_token_at - self.arrival

    @property
    def tpot(self) -> Optional[float]:
        n = self.output_len - 1
        return (self.finished_at - self.first_token_at) / n if n > 0 else None


def commit_first_token(req: SimRequest, now: float) -> None:
    req.first_token_at, req.generated = now, 1
    if req.output_len <= 1:
        req.finished_at = now


class StepWorker:
    """One worker's overlap loop; `compose()` returns the next step's (seconds, at_end) or None.

    The loop launches a batch before it waits for the running one: whenever a step starts, the
    one after it is composed from what the worker has read by then; at a step's end the queued
    one runs at once, the ended step's results are processed, the messages that came during it
    are read, and the step after the queued one is composed."""

    def __init__(self, clock: Clock, co_run: float = 1.0):
        self.clock, self.co_run = clock, co_run
        self.others: list[StepWorker] = []         # the other role's workers on the host
        self.is_busy = False
        self.launched = None                       # composed, runs when the current step ends
        self.inbox: list[Callable[[], None]] = []

    def deliver(self, message: Callable[[], None]) -> None:
        """A message for this worker: read at once when idle, else at the running step's end."""
        if self.is_busy:
            self.inbox.append(message)
            return
        message()
        self._launch()

    def _launch(self) -> None:
        planned = self.compose()
        if planned is None:
            return
        if self.is_busy:
            self.launched = planned
            return
        self._run(planned)
        self._launch()                             # launched before the loop waits on the first

    def _run(self, planned) -> None:
        seconds, at_end = planned
        if any(w.is_busy for w in self.others):    # sharing the host's cores: co_run.py
            seconds *= self.co_run
        self.is_busy = True

        def end():
            self.is_busy = False
            queued, self.launched = self.launched, None
            if queued is not None:
                self._run(queued)
            at_end()
            inbox, self.inbox = self.inbox, []
            for message in inbox:
                message()
            self._launch()
        self.clock.at(self.clock.now + seconds, end)

    def compose(self):
        raise NotImplementedError


class DecodeSim(StepWorker):
    def __init__(self, clock: Clock, costs: CostModel, max_running: int):
        super().__init__(clock, costs.co_run_decode)
        self.costs, self.max_running = costs, max_running
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.reserved = 0                          # requests whose KV is still to come

    @property
    def load(self) -> int:
        return self.reserved + len(self.waiting) + len(self.running)

    def reserve(self, req: SimRequest, then: Callable[[], None]) -> None:
        """Read the request, reserve its pages, tell prefill (`then`: the `decode_ready`)."""
        self.reserved += 1
        self.deliver(then)

    def land(self, req: SimRequest) -> None:
        """Its KV came: read at a boundary, the first token committed, then it decodes."""
        def read():
            self.reserved -= 1
            commit_first_token(req, self.clock.now)
            if req.finished_at is None:
                self.waiting.append(req)
        self.deliver(read)

    def _next_batch(self) -> list[SimRequest]:
        while self.waiting and len(self.running) < self.max_running:
            self.running.append(self.waiting.popleft())
        return list(self.running)

    def _decode_seconds(self, batch: list[SimRequest]) -> float:
        return self.costs.decode_step(len(batch), sum(r.seq_len for r in batch)) if batch else 0.0

    def compose(self):
        batch = self._next_batch()
        if not batch:
            return None
        return self._decode_seconds(batch), lambda: self._advance(batch)

    def _advance(self, batch: list[SimRequest]) -> None:
        for r in batch:
            if r.finished_at is not None:          # rode one step past its last token
                continue
            r.generated += 1
            if r.generated >= r.output_len:
                r.finished_at = self.clock.now
                self.running.remove(r)


class PrefillSim(StepWorker):
    def __init__(self, clock: Clock, costs: CostModel, max_prefill_tokens: int):
        super().__init__(clock, costs.co_run_prefill)
        self.costs, self.max_prefill_tokens = costs, max_prefill_tokens
        self.queue: deque[tuple[SimRequest, DecodeSim]] = deque()

    def admit(self, req: SimRequest, decode: DecodeSim) -> None:
        """The request with its decode worker: schedulable once decode said `decode_ready`."""
        decode.reserve(req, lambda: self.deliver(lambda: self.queue.append((req, decode))))

    def compose(self):
        if not self.queue:
            return None
        batch = [self.queue.popleft()]
        tokens = batch[0][0].input_len
        while self.queue and tokens + self.queue[0][0].input_len <= self.max_prefill_tokens:
            tokens += self.queue[0][0].input_len
            batch.append(self.queue.popleft())
        return self.costs.prefill(tokens), lambda: self._hand_off(batch)

    def _hand_off(self, batch) -> None:
        for r, decode in batch:
            self.clock.at(self.clock.now + self.costs.transfer(r.input_len), lambda r=r, d=decode: d.land(r))


class UnifiedSim(DecodeSim):
    """Chunked prefill mixed into the decode batch: each step takes up to `max_prefill_tokens`
    prompt tokens FCFS and the running decodes, costing the chunk's prefill plus the decode step."""

    def __init__(self, clock: Clock, costs: CostModel, max_running: int, max_prefill_tokens: int):
        super().__init__(clock, costs, max_running)
        self.max_prefill_tokens = max_prefill_tokens
        self.queue: deque[SimRequest] = deque()

    def admit(self, req: SimRequest) -> None:
        self.deliver(lambda: self.queue.append(req))

    def compose(self):
        batch = self._next_batch()
        chunks, budget = [], self.max_prefill_tokens
        for r in self.queue:                           # FCFS chunks, the last may be partial
            if budget <= 0 or len(batch) + len(chunks) >= self.max_running:
                break
            n = min(budget, r.input_len - r.scheduled)
            chunks.append((r, n))
            budget -= n
        if not batch and not chunks:
            return None
        for r, n in chunks:
            r.scheduled += n
            if r.scheduled == r.input_len:
                self.queue.remove(r)
        seconds = self.costs.prefill(sum(n for _, n in chunks)) if chunks else 0.0
        return seconds + self._decode_seconds(batch), lambda: self._end(batch, chunks)

    def _end(self, batch, chunks) -> None:
        self._advance(batch)
        for r, n in chunks:
            r.prefilled += n
            if r.prefilled == r.input_len:
                commit_first_token(r, self.clock.now)
                if r.finished_at is None:
                    self.waiting.append(r)
