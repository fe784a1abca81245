"""A discrete-event simulation of one static layout under a cost model (costs.py).

The scheduling rules are the cluster's: a prefill worker takes FCFS batches of whole
prompts up to `max_prefill_tokens` (at least one prompt); its batch's last forward samples
each first token, then the KV moves to the decode worker with the fewest requests (transfer
time from the profile); a decode worker runs continuous batching (whoever arrived during a
step joins the next, up to `max_running`). A unified worker runs chunked prefill: each step
takes up to `max_prefill_tokens` prompt tokens FCFS and its running decodes, costing the
chunk's prefill plus the batch's decode step, so prompts slow the decodes they join.
Requests go round robin to prefill (or unified) workers, as the router's default policy.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from cluster.plan.costs import CostModel


@dataclass
class SimRequest:
    arrival: float
    input_len: int
    output_len: int
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


@dataclass(frozen=True)
class Layout:
    """Workers per role and the tensor-parallel ranks (GPUs) of each of a role's workers."""
    prefill: int = 0
    decode: int = 0
    unified: int = 0
    prefill_tp: int = 1
    decode_tp: int = 1
    unified_tp: int = 1

    @property
    def name(self) -> str:
        tp = lambda t: f"(tp{t})" if t > 1 else ""      # noqa: E731
        if self.unified:
            return f"unified x{self.unified}{tp(self.unified_tp)}"
        return f"{self.prefill}P{tp(self.prefill_tp)}{self.decode}D{tp(self.decode_tp)}"

    @property
    def gpus(self) -> int:
        return self.prefill * self.prefill_tp + self.decode * self.decode_tp + self.unified * self.unified_tp


def layouts_for(gpus: int, tps: tuple[int, ...] = (1,)) -> list[Layout]:
    """Every static layout of `gpus` GPUs whose workers have a tp of `tps`: all unified (one tp),
    or xPyD (a tp for the prefill workers, one for the decode workers) using every GPU."""
    out = [Layout(unified=gpus // t, unified_tp=t) for t in tps if gpus % t == 0]
    for a in tps:
        for b in tps:
            out += [Layout(x, (gpus - x * a) // b, prefill_tp=a, decode_tp=b) for x in range(1, gpus // a + 1)
                    if gpus - x * a > 0 and (gpus - x * a) % b == 0]
    return out


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


class StepWorker:
    """A worker that runs one step at a time while it has work; `step()` returns the step's
    duration and what to do at its end, or None when idle."""

    def __init__(self, clock: Clock):
        self.clock, self.is_busy = clock, False

    def wake(self) -> None:
        if self.is_busy:
            return
        planned = self.step()
        if planned is None:
            return
        seconds, done = planned
        self.is_busy = True

        def end():
            self.is_busy = False
            done()
            self.wake()
        self.clock.at(self.clock.now + seconds, end)

    def step(self):
        raise NotImplementedError


class DecodeSim(StepWorker):
    def __init__(self, clock: Clock, costs: CostModel, max_running: int):
        super().__init__(clock)
        self.costs, self.max_running = costs, max_running
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def admit(self, req: SimRequest) -> None:
        self.waiting.append(req)
        self.wake()

    def _next_batch(self) -> list[SimRequest]:
        """The running set after the requests that arrived during the last step joined."""
        while self.waiting and len(self.running) < self.max_running:
            self.running.append(self.waiting.popleft())
        return list(self.running)

    def _decode_seconds(self, batch: list[SimRequest]) -> float:
        return self.costs.decode_step(len(batch), sum(r.seq_len for r in batch)) if batch else 0.0

    def step(self):
        batch = self._next_batch()
        if not batch:
            return None
        return self._decode_seconds(batch), lambda: self._advance(batch)

    def _advance(self, batch: list[SimRequest]) -> None:
        for r in batch:
            r.generated += 1
            if r.generated >= r.output_len:
                r.finished_at = self.clock.now
                self.running.remove(r)


def _first_token(req: SimRequest, now: float) -> None:
    req.first_token_at, req.generated = now, 1
    if req.output_len <= 1:
        req.finished_at = now


class PrefillSim(StepWorker):
    def __init__(self, clock: Clock, costs: CostModel, max_prefill_tokens: int,
                 decode: list[DecodeSim]):
        super().__init__(clock)
        self.costs, self.max_prefill_tokens, self.decode = costs, max_prefill_tokens, decode
        self.queue: deque[SimRequest] = deque()

    def admit(self, req: SimRequest) -> None:
        self.queue.append(req)
        self.wake()

    def step(self):
        if not self.queue:
            return None
        batch = [self.queue.popleft()]
        tokens = batch[0].input_len
        while self.queue and tokens + self.queue[0].input_len <= self.max_prefill_tokens:
            tokens += self.queue[0].input_len
            batch.append(self.queue.popleft())
        return self.costs.prefill(tokens), lambda: self._hand_off(batch)

    def _hand_off(self, batch: list[SimRequest]) -> None:
        for r in batch:
            _first_token(r, self.clock.now)
            if r.finished_at is None:
                target = min(self.decode, key=lambda d: d.load)
                self.clock.at(self.clock.now + self.costs.transfer(r.input_len),
                              lambda r=r, d=target: d.admit(r))


class UnifiedSim(DecodeSim):
    def __init__(self, clock: Clock, costs: CostModel, max_running: int, max_prefill_tokens: int):
        super().__init__(clock, costs, max_running)
        self.max_prefill_tokens = max_prefill_tokens
        self.queue: deque[SimRequest] = deque()

    def admit(self, req: SimRequest) -> None:
        self.queue.append(req)
        self.wake()

    def step(self):
        batch = self._next_batch()
        chunks, budget = [], self.max_prefill_tokens
        for r in self.queue:                           # FCFS chunks, the last may be partial
            if budget <= 0 or len(batch) + len(chunks) >= self.max_running:
                break
            n = min(budget, r.input_len - r.prefilled)
            chunks.append((r, n))
            budget -= n
        if not batch and not chunks:
            return None
        seconds = self.costs.prefill(sum(n for _, n in chunks)) if chunks else 0.0
        return seconds + self._decode_seconds(batch), lambda: self._end(batch, chunks)

    def _end(self, batch, chunks) -> None:
        self._advance(batch)
        for r, n in chunks:
            r.prefilled += n
            if r.prefilled == r.input_len:
                self.queue.remove(r)
                _first_token(r, self.clock.now)
                if r.finished_at is None:
                    self.waiting.append(r)


def simulate(layout: Layout, costs: CostModel, requests: list[SimRequest], *,
             max_prefill_tokens: int = 4096, max_running: int = 64) -> list[SimRequest]:
    """Run `requests` (arrival times set) through `layout`; they come back finished."""
    clock = Clock()
    if layout.unified:
        entry = [UnifiedSim(clock, costs.for_tp(layout.unified_tp), max_running, max_prefill_tokens)
                 for _ in range(layout.unified)]
    else:
        decode = [DecodeSim(clock, costs.for_tp(layout.decode_tp), max_running) for _ in range(layout.decode)]
        entry = [PrefillSim(clock, costs.for_tp(layout.prefill_tp), max_prefill_tokens, decode)
                 for _ in range(layout.prefill)]
    for i, r in enumerate(requests):
        clock.at(r.arrival, lambda r=r, w=entry[i % len(entry)]: w.admit(r))
    clock.run()
    return requests
