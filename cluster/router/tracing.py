"""The router's request tracing: each request's trace from admission to its end, kept in a
bounded ring for `GET /debug/requests/{id}`, its phases observed into
`pdcluster:request_phase_seconds{phase}`, and exported as OpenTelemetry spans when
`[tracing] otlp_endpoint` is set (tracing off: no SDK import, no span objects).
"""
from __future__ import annotations

from typing import Callable, Optional

from cluster.router.otlp_export import new_span_exporter
from cluster.router.request_trace import RecentRequests, RequestTrace


class RequestTracing:
    def __init__(self, otlp_endpoint: str = "",
                 observe_phase: Optional[Callable[[str, float], None]] = None):
        self.recent = RecentRequests()
        self.spans = new_span_exporter(otlp_endpoint)
        self.observe_phase = observe_phase

    def begin(self, rid: str, model: str, route: str, arrival: float,
              traceparent: Optional[str] = None) -> RequestTrace:
        trace = RequestTrace(rid, model, route, arrival=arrival, traceparent=traceparent)
        self.recent.add(trace)
        return trace

    def end(self, trace: RequestTrace, outcome: str, finish_reason: Optional[str] = None,
            error: Optional[str] = None) -> None:
        if trace.is_finished:
            return
        trace.finish(outcome, finish_reason, error)
        if outcome == "success" and self.observe_phase is not None:
            for phase in trace.phases():
                self.observe_phase(phase.name, phase.duration_s)
        if self.spans is not None:
            self.spans.export(trace, trace.traceparent)

    def get(self, request_id: str) -> Optional[RequestTrace]:
        """A recent request by its id, also as the API's `cmpl-<id>` / `chatcmpl-<id>`."""
        for prefix in ("chatcmpl-", "cmpl-"):
            request_id = request_id.removeprefix(prefix)
        return self.recent.get(request_id)

    def close(self) -> None:
        if self.spans is not None:
            self.spans.close()
