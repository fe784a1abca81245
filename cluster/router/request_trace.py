"""Per-request phases, assembled by the router from its own marks and the workers'.

A request's life is a chain of marks on one wall clock (`time.time()`: marks taken in
worker processes line up with the router's on one host; across hosts, skew is clamped so
marks never run backwards). Each phase is named by the mark that ends it and starts at the
mark before it, so the phases partition the end-to-end latency:

    phase            ends at mark             set by    when
    -                arrival                  router    the HTTP request came in
    router_queue     dispatched               router    `generate` of the final attempt sent
    prefill_queue    prefill_launched         prefill   run_batch of the prompt's first chunk
    prefill_forward  prefill_done             prefill   first token sampled, KV sent
    kv_transfer      kv_received              decode    KV imported, first token emitted
    decode_queue     first_decode_launched    decode    first decode batch with one new token
    first_decode     first_decode_done        decode    its result processed
    decode           finished                 router    the last token came in

Attributes ride on marks (worker, forward_iter, bytes, backend...); a phase shows those of
the mark that ends it, since that is where its owner knows how it went. A unified worker
sends no `kv_received`, so its `decode_queue` follows `prefill_forward`.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from cluster.wire.messages import WORKER_MARKS   # MARKS[2:-1] and decode_done (attributes only)

PHASES = ("router_queue", "prefill_queue", "prefill_forward", "kv_transfer", "decode_queue",
          "first_decode", "decode")
MARKS = ("arrival", "dispatched", "prefill_launched", "prefill_done", "kv_received",
         "first_decode_launched", "first_decode_done", "finished")
PHASE_ENDED_BY = dict(zip(MARKS[1:], PHASES))
ROUTE_MARKS = {"pd": MARKS,                # the marks each route goes through, in order
               "unified": tuple(m for m in MARKS if m != "kv_received"),
               "dllm": ("arrival", "dispatched", "prefill_launched", "prefill_done", "finished"),
               "dllm_remote": ("arrival", "dispatched", "prefill_launched", "prefill_done", "kv_received",
                               "finished")}
MAX_TOKEN_EVENTS = 256                     # per request; later ones are only counted
RECENT_REQUESTS = 1000                     # /debug/requests keeps this many


@dataclass(frozen=True, slots=True)
class Mark:
    t: float                               # wall clock, seconds
    attrs: dict


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    start: float
    end: Optional[float]                   # None while the request is still in it
    attrs: dict

    @property
    def duration_s(self) -> Optional[float]:
        return None if self.end is None else self.end - self.start


@dataclass(frozen=True, slots=True)
class TokenArrival:
    t: float                               # router wall clock when the tokens came in
    num_tokens: int
    forward_iter: Optional[int]            # the batch that sampled them (for a handed-off
                                           # request's first token: the prefill worker's)


@dataclass(slots=True)
class RequestTrace:
    rid: str
    model: str
    route: str
    arrival: float = field(default_factory=time.time)
    marks: dict = field(default_factory=dict)          # mark name -> Mark
    tokens: list = field(default_factory=list)         # TokenArrival, at most MAX_TOKEN_EVENTS
    num_tokens: int = 0
    events: list = field(default_factory=list)         # {"name", "t", ...}: redispatch, failure
    outcome: Optional[str] = None                      # success | error | timeout | aborted
    finish_reason: Optional[str] = None
    traceparent: Optional[str] = None                  # the client's W3C trace context

    def __post_init__(self):
        self.marks["arrival"] = Mark(self.arrival, {})

    def mark(self, name: str, t: Optional[float] = None, **attrs) -> None:
        if name not in MARKS:
            raise ValueError(f"unknown mark {name!r} (known: {', '.join(MARKS)})")
        self.marks[name] = Mark(time.time() if t is None else t, attrs)

    def merge_worker_marks(self, marks: dict, worker: str) -> None:
        """Marks a worker reported ({name: [t, attrs]}); unknown names are ignored."""
        for name, (t, attrs) in marks.items():
            if name in WORKER_MARKS:
                self.marks[name] = Mark(float(t), {"worker": worker, **attrs})

    def redispatch(self, reason: str, attempt: int) -> None:
        """A new attempt starts: the old attempt's worker marks no longer describe it."""
        for name in WORKER_MARKS:
            self.marks.pop(name, None)
        self.events.append({"name": "redispatch", "t": time.time(), "attempt": attempt,
                            "reason": reason})

    def add_tokens(self, num_tokens: int, forward_iter: Optional[int] = None,
                   t: Optional[float] = None) -> None:
        self.num_tokens += num_tokens
        if len(self.tokens) < MAX_TOKEN_EVENTS:
            self.tokens.append(TokenArrival(time.time() if t is None else t, num_tokens,
                                            forward_iter))

    def add_arrival(self, arrival: TokenArrival) -> None:
        """`add_tokens` of an arrival built once for a whole step (frozen: shared by its rows)."""
        self.num_tokens += arrival.num_tokens
        if len(self.tokens) < MAX_TOKEN_EVENTS:
            self.tokens.append(arrival)

    def finish(self, outcome: str, finish_reason: Optional[str] = None,
               error: Optional[str] = None, t: Optional[float] = None) -> None:
        self.outcome, self.finish_reason = outcome, finish_reason
        self.mark("finished", t, num_tokens=self.num_tokens, outcome=outcome,
                  **({"finish_reason": finish_reason} if finish_reason else {}))
        if error:
            self.events.append({"name": "failed", "t": self.marks["finished"].t, "reason": error})

    @property
    def is_finished(self) -> bool:
        return "finished" in self.marks

    @property
    def e2e_s(self) -> Optional[float]:
        end = self.marks.get("finished")
        return None if end is None else end.t - self.arrival

    def phases(self) -> list[Phase]:
        """The phases reached, in order, clamped so no mark precedes the one before it. A
        request in flight ends with the phase it is in (end None); one that failed ends
        with the phase it failed in; a successful one with `decode`."""
        end = self.marks.get("finished")
        out, prev = [], self.arrival
        for name in MARKS[1:-1]:
            mark = self.marks.get(name)
            if mark is None:
                continue
            t = max(mark.t, prev)
            t = min(t, end.t) if end is not None else t
            out.append(Phase(PHASE_ENDED_BY[name], prev, t, dict(mark.attrs)))
            prev = t
        current = self._current_phase()
        if end is not None:
            attrs = dict(end.attrs)
            if "decode_done" in self.marks:                      # the decode worker's side
                attrs = {**self.marks["decode_done"].attrs, **attrs}
            name = "decode" if self.outcome == "success" else current
            out.append(Phase(name or "decode", prev, max(end.t, prev), attrs))
        elif current is not None:
            out.append(Phase(current, prev, None, {}))
        return out

    def _current_phase(self) -> Optional[str]:
        """The phase after the last mark reached, on this request's route."""
        route = ROUTE_MARKS.get(self.route, MARKS)
        last = max(MARKS.index(n) for n in tuple(self.marks) if n != "finished" and n in MARKS)
        upcoming = [m for m in route if MARKS.index(m) > last]
        return PHASE_ENDED_BY[upcoming[0]] if upcoming else None

    def to_json(self) -> dict:
        """What `GET /debug/requests/{id}` returns: times in seconds, offsets from arrival."""
        rel = lambda t: None if t is None else round(t - self.arrival, 6)   # noqa: E731
        return {
            "id": self.rid, "model": self.model, "route": self.route,
            "arrival_unix_s": self.arrival,
            "status": self.outcome or "in_flight", "finish_reason": self.finish_reason,
            "e2e_s": None if self.e2e_s is None else round(self.e2e_s, 6),
            "num_tokens": self.num_tokens,
            "phases": [{"phase": p.name, "start_s": rel(p.start), "end_s": rel(p.end),
                        "duration_s": None if p.end is None else round(p.duration_s, 6),
                        **p.attrs} for p in self.phases()],
            "tokens": [{"t_s": rel(a.t), "num_tokens": a.num_tokens,
                        "forward_iter": a.forward_iter} for a in self.tokens],
            "events": [{**e, "t": rel(e["t"])} for e in self.events],
        }


class RecentRequests:
    """The traces of the last `capacity` admitted requests (in flight ones included)."""

    def __init__(self, capacity: int = RECENT_REQUESTS):
        self.capacity = capacity
        self._traces: OrderedDict[str, RequestTrace] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, trace: RequestTrace) -> None:
        with self._lock:
            self._traces[trace.rid] = trace
            while len(self._traces) > self.capacity:
                self._traces.popitem(last=False)

    def get(self, rid: str) -> Optional[RequestTrace]:
        with self._lock:
            return self._traces.get(rid)

    def __len__(self) -> int:
        return len(self._traces)
