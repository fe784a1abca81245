"""Messages between the router's HTTP front ends and its dispatcher (`[router] api_servers` > 1).

Each front end is a process that serves HTTP, tokenizes, detokenizes and streams; it connects a
DEALER (identity `frontend-N`) to the dispatcher's control socket, beside the workers. It
admits requests with `frontend_submit` (answered by a `frontend_reply` with the same
ticket), gets their tokens and failures as `frontend_events` (one message per worker step),
aborts with `frontend_abort`, ends a request's trace with `frontend_end`, forwards what
needs the dispatcher's state (health, metrics, /debug, /admin, /internal) as
`frontend_query`, and reports its own metrics and CPU time with `frontend_report`, which the
dispatcher answers with `frontend_state`. The checks sit beside the types; protocol.py
encodes and decodes them like every other message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from cluster.sampling_params import SamplingParams
from cluster.wire.checks import Float, Int, List, Map, MAX_KEYS, Number, Opt, Scalar, Str, Strs, TokenIds, Typed

QUERIES = ("health", "metrics", "debug_request", "internal_workers", "worker_exit", "admin_workers",
           "switch_role")
OUTCOMES = ("success", "error", "timeout", "aborted", "rejected")


@dataclass(frozen=True, slots=True)
class FrontendRequest:
    """One request a front end admitted: what the dispatcher places, sends and traces."""
    rid: str                                      # the public request id
    model: str
    route: str                                    # "pd" (any prefill/decode path) | "dllm"
    input_ids: list
    sampling: SamplingParams
    dllm: dict                                    # DllmParams overrides
    arrival: float                                # wall clock of the HTTP request
    traceparent: Optional[str] = None


@dataclass(frozen=True, slots=True)
class FrontendEvent:
    """A request's new tokens, or its failure (`status` set)."""
    rid: str
    token_ids: list
    finish_reason: Optional[str] = None
    logprobs: Optional[list] = None
    top_logprobs: Optional[list] = None
    prompt_logprobs: Optional[list] = None
    status: Optional[int] = None                  # the HTTP status the request fails with
    message: Optional[str] = None
    error_type: Optional[str] = None


@dataclass(frozen=True, slots=True)
class MetricSample:
    """One sample of a router series, as prometheus_client names it (`_bucket`, `_sum`, ...)."""
    name: str
    labels: dict                                  # str -> str
    value: float


@dataclass(frozen=True, slots=True)
class FrontendSubmit:                             # front end -> dispatcher
    TYPE: ClassVar[str] = "frontend_submit"
    ticket: int
    requests: list                                # FrontendRequest; several: n choices of one prompt


@dataclass(frozen=True, slots=True)
class FrontendEvents:                             # dispatcher -> front end
    TYPE: ClassVar[str] = "frontend_events"
    items: list                                   # FrontendEvent
    # requests that got one bare token (a steady decode step), packed as two lists
    plain_rids: list = field(default_factory=list)
    plain_token_ids: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.plain_rids) != len(self.plain_token_ids):
            raise ValueError(f"{len(self.plain_rids)} rids for {len(self.plain_token_ids)} tokens")


@dataclass(frozen=True, slots=True)
class FrontendAbort:                              # front end -> dispatcher: the client went away
    TYPE: ClassVar[str] = "frontend_abort"
    rid: str
    reason: str


@dataclass(frozen=True, slots=True)
class FrontendEnd:                                # front end -> dispatcher: how a request ended
    TYPE: ClassVar[str] = "frontend_end"
    rid: str
    outcome: str
    finish_reason: Optional[str] = None
    error: Optional[str] = None


@dataclass(frozen=True, slots=True)
class FrontendQuery:                              # front end -> dispatcher
    TYPE: ClassVar[str] = "frontend_query"
    ticket: int
    what: str                                     # one of QUERIES
    args: dict                                    # str -> scalar


@dataclass(frozen=True, slots=True)
class FrontendReply:                              # dispatcher -> front end
    TYPE: ClassVar[str] = "frontend_reply"
    ticket: int
    status: int                                   # HTTP status of the answer
    body: str                                     # JSON text (the metrics page: Prometheus text)
    retry_after: Optional[int] = None


@dataclass(frozen=True, slots=True)
class FrontendReport:                             # front end -> dispatcher, periodically
    TYPE: ClassVar[str] = "frontend_report"
    pid: int
    cpu_seconds: float                            # the process's user + system time so far
    samples: list                                 # MetricSample: its router series, cumulative
    slo: list                                     # [[ttft, tpot or None], ...] finished since the last report


@dataclass(frozen=True, slots=True)
class FrontendState:                              # dispatcher -> front end: answers a report
    TYPE: ClassVar[str] = "frontend_state"
    dllm_models: list                             # served DLLM models the workers registered


ID, TEXT = Str(max_len=1024), Str()
_EVENT = Typed(FrontendEvent, {
    "rid": ID, "token_ids": TokenIds(), "finish_reason": Opt(TEXT), "logprobs": Opt(List(Float())),
    "top_logprobs": Opt(List(List(List(Number(), min_len=2, max_len=2)), max_len=MAX_KEYS)),
    "prompt_logprobs": Opt(List(Float())), "status": Opt(Int(lo=400, hi=599)), "message": Opt(TEXT),
    "error_type": Opt(Str(max_len=64))})
FRONTEND_FIELDS = {
    FrontendSubmit: {"ticket": Int(lo=0), "requests": List(Typed(FrontendRequest, {
        "rid": ID, "model": TEXT, "route": Str(choices=("pd", "dllm")), "input_ids": TokenIds(min_len=1),
        "sampling": Typed(SamplingParams), "dllm": Map(Str(max_len=64), Scalar(), max_len=16),
        "arrival": Float(finite=True), "traceparent": Opt(Str(max_len=256))}), min_len=1, max_len=MAX_KEYS)},
    FrontendEvents: {"items": List(_EVENT, max_len=MAX_KEYS), "plain_rids": Strs(1024, MAX_KEYS),
                     "plain_token_ids": TokenIds()},
    FrontendAbort: {"rid": ID, "reason": TEXT},
    FrontendEnd: {"rid": ID, "outcome": Str(choices=OUTCOMES), "finish_reason": Opt(TEXT), "error": Opt(TEXT)},
    FrontendQuery: {"ticket": Int(lo=0), "what": Str(choices=QUERIES),
                    "args": Map(Str(max_len=64), Scalar(), max_len=16)},
    FrontendReply: {"ticket": Int(lo=0), "status": Int(lo=100, hi=599), "body": TEXT,
                    "retry_after": Opt(Int(lo=0))},
    FrontendReport: {"pid": Int(lo=0), "cpu_seconds": Float(finite=True),
                     "samples": List(Typed(MetricSample, {"name": Str(max_len=256),
                                                          "labels": Map(Str(max_len=64), Str(max_len=256), max_len=8),
                                                          "value": Float()}), max_len=4096),
                     "slo": List(List(Opt(Float(finite=True)), min_len=2, max_len=2), max_len=1 << 16)},
    FrontendState: {"dllm_models": List(Str(max_len=256), max_len=256)},
}
FRONTEND_MESSAGES = tuple(FRONTEND_FIELDS)
