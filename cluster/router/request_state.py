"""What the router keeps per in-flight request, and the events it hands to the HTTP side.

A request keeps one public `rid` for its whole life; every dispatch attempt gets its own
wire rid (`<rid>.<attempt>`), so tokens or errors from a worker that lost the request
(declared dead, then back) can never be mistaken for the current attempt's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from cluster.router.request_trace import RequestTrace
from cluster.sampling_params import SamplingParams


@dataclass
class TokensEvent:
    token_ids: list[int]
    logprobs: Optional[list[float]]
    finish_reason: Optional[str]
    top_logprobs: Optional[list] = None   # per token: [[token_id, logprob], ...]
    prompt_logprobs: Optional[list] = None   # echo with logprobs: prompt tokens 1.., with the first token

    @property
    def is_plain(self) -> bool:
        """One token and nothing else: a steady decode step's event."""
        return (len(self.token_ids) == 1 and self.finish_reason is None and self.logprobs is None
                and self.top_logprobs is None and self.prompt_logprobs is None)


@dataclass
class FailedEvent:
    status: int                       # HTTP status the client gets (500, 503, 504)
    message: str
    type: str = "internal_error"


Event = TokensEvent | FailedEvent


def coalesced(events: list) -> list:
    """Runs of TokensEvents folded into one each (a failure stays its own event)."""
    out: list = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, TokensEvent) and isinstance(prev, TokensEvent) and prev.finish_reason is None:
            join = lambda x, y: x + y if x is not None and y is not None else None  # noqa: E731
            out[-1] = TokensEvent(prev.token_ids + ev.token_ids, join(prev.logprobs, ev.logprobs),
                                  ev.finish_reason, join(prev.top_logprobs, ev.top_logprobs),
                                  prev.prompt_logprobs or ev.prompt_logprobs)
        else:
            out.append(ev)
    return out


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one attempt of a request runs. `decode` streams its tokens; `prefill` processes
    its prompt and is the same worker when one worker does both (`unified`, `dllm`, and
    `local`: a decode worker prefilling a short uncached remainder itself), or None once a
    pair's prefill worker is gone after handing the request over. `dllm_remote`: a DLLM
    request whose prompt a prefill worker prefills for its DLLM worker (`decode`)."""
    route: str                        # "pd" | "local" | "unified" | "dllm" | "dllm_remote"
    prefill: Optional[str]
    decode: str

    @classmethod
    def single(cls, route: str, worker_id: str) -> "Placement":
        return cls(route, worker_id, worker_id)

    @property
    def is_pair(self) -> bool:
        return self.prefill is not None and self.prefill != self.decode

    @property
    def workers(self) -> tuple[str, ...]:
        """Each worker of the attempt once: (prefill, decode) of a pair, else (decode,)."""
        return (self.prefill, self.decode) if self.is_pair else (self.decode,)

    def without_prefill(self) -> "Placement":
        """The pair after its prefill worker died holding nothing of the request any more."""
        return Placement(self.route, None, self.decode)


@dataclass(slots=True)
class RequestState:
    rid: str
    model: str
    route: str                        # requested: "pd" (any prefill/decode path) | "dllm"
    input_ids: list[int]
    sampling: SamplingParams
    sink: Callable[[Event], None]     # thread-safe hand-off to the HTTP coroutine
    dllm: dict = field(default_factory=dict)  # DllmParams overrides (dllm route)
    output_ids: list[int] = field(default_factory=list)
    attempt: int = 0
    placement: Optional[Placement] = None   # the current attempt's workers; None while parked
    last_progress: float = field(default_factory=time.monotonic)
    is_parked: bool = False           # waiting for a worker to (re)appear
    trace: Optional[RequestTrace] = None   # its phases, for /debug, metrics and spans

    @property
    def wire_rid(self) -> str:
        return f"{self.rid}.{self.attempt}"

    @property
    def workers(self) -> tuple[str, ...]:
        return self.placement.workers if self.placement is not None else ()

    @property
    def token_source(self) -> Optional[str]:
        """The worker whose `tokens` count: decode in a pair, else the single worker."""
        return self.placement.decode if self.placement is not None else None

    @property
    def is_exhausted(self) -> bool:
        """A resumed request whose tokens already sent reach max_tokens: nothing left to do."""
        return len(self.output_ids) >= self.sampling.max_tokens
