"""OpenTelemetry spans of finished requests, exported over OTLP/HTTP (`[tracing] otlp_endpoint`).

One trace per request (its trace id is the request id, so `x-request-id` finds it in
Jaeger or Tempo), a root span `request` from arrival to finish and a child span per
phase of `RequestTrace.phases()` carrying its attributes (`pdcluster.worker`,
`pdcluster.forward_iter`, KV `pdcluster.bytes` and `pdcluster.backend`...). Spans are built
after the fact with the recorded timestamps and handed to a BatchSpanProcessor, whose
thread does the network I/O: the request path only builds a few span objects.

A client that sends a W3C `traceparent` gets the request span as a child of its own span
(the trace id is then the client's). The SDK and exporter are the optional extra
`tracing`; with no endpoint this module is never imported, so tracing off costs nothing.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Optional

from cluster.router.request_trace import RequestTrace

log = logging.getLogger("pdcluster.router")
EXPORT_DELAY_MS = 1000               # how long spans may wait to be batched
EXPORT_QUEUE = 1 << 16               # spans waiting for export (8 per request); beyond: dropped
TRACES_PATH = "/v1/traces"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
MISSING_SDK = ("[tracing] otlp_endpoint is set but the OpenTelemetry SDK is not installed: "
               "pip install 'pdcluster[tracing]'")


def traces_url(endpoint: str) -> str:
    """`http://host:4318` -> `http://host:4318/v1/traces`; a URL with a path is kept."""
    scheme, _, rest = endpoint.partition("://")
    return endpoint if "/" in rest.rstrip("/") else endpoint.rstrip("/") + TRACES_PATH


def _ns(t: float) -> int:
    return int(t * 1e9)


def _attr(value):
    """OTLP attribute values are str, bool, int, float or lists of one of them."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return list(value)
    return str(value)


class SpanExporter:
    def __init__(self, endpoint: str, service_name: str = "pdcluster"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
            from opentelemetry import trace as otel_trace
        except ImportError as e:
            raise RuntimeError(f"{MISSING_SDK} ({e})") from None

        class RequestIds(RandomIdGenerator):
            """The root span's trace id is the request id, when it is a 128-bit hex id."""
            next_trace_id: Optional[int] = None

            def generate_trace_id(self) -> int:
                return self.next_trace_id or super().generate_trace_id()

        self._otel = otel_trace
        self._ids = RequestIds()
        self._lock = threading.Lock()      # guards next_trace_id between build and start
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                                       id_generator=self._ids)
        self.provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=10),
            schedule_delay_millis=EXPORT_DELAY_MS, max_queue_size=EXPORT_QUEUE))
        self.tracer = self.provider.get_tracer("pdcluster.router")
        log.info("tracing: exporting request spans to %s", traces_url(endpoint))

    def _parent(self, traceparent: Optional[str]):
        m = TRACEPARENT.fullmatch((traceparent or "").strip().lower())
        if m is None or int(m.group(1), 16) == 0 or int(m.group(2), 16) == 0:
            return None
        ctx = self._otel.SpanContext(int(m.group(1), 16), int(m.group(2), 16), is_remote=True,
                                     trace_flags=self._otel.TraceFlags(int(m.group(3), 16)))
        return self._otel.set_span_in_context(self._otel.NonRecordingSpan(ctx))

    def export(self, trace: RequestTrace, traceparent: Optional[str] = None) -> None:
        """Build the request's spans from its marks; the processor ships them later."""
        end = trace.marks["finished"].t if trace.is_finished else None
        root_attrs = {"pdcluster.request_id": trace.rid, "gen_ai.request.model": trace.model,
                      "pdcluster.route": trace.route, "pdcluster.status": trace.outcome or "",
                      "gen_ai.usage.output_tokens": trace.num_tokens}
        if trace.finish_reason:
            root_attrs["gen_ai.response.finish_reasons"] = [trace.finish_reason]
        parent = self._parent(traceparent)
        with self._lock:
            try:
                self._ids.next_trace_id = int(trace.rid, 16) if parent is None else None
            except ValueError:
                self._ids.next_trace_id = None
            root = self.tracer.start_span("request", context=parent, attributes=root_attrs,
                                          start_time=_ns(trace.arrival))
            self._ids.next_trace_id = None
        ctx = self._otel.set_span_in_context(root)
        phases = trace.phases()
        for phase in phases:
            span = self.tracer.start_span(phase.name, context=ctx, start_time=_ns(phase.start),
                                          attributes={f"pdcluster.{k}": _attr(v)
                                                      for k, v in phase.attrs.items()})
            if phase.name == "decode":
                for a in trace.tokens:
                    if a.t >= phase.start:
                        span.add_event("tokens", {"num_tokens": a.num_tokens,
                                                  "forward_iter": a.forward_iter or 0},
                                       timestamp=_ns(a.t))
            span.end(end_time=_ns(phase.end if phase.end is not None else (end or phase.start)))
        for event in trace.events:
            root.add_event(event["name"], {k: _attr(v) for k, v in event.items()
                                           if k not in ("name", "t")}, timestamp=_ns(event["t"]))
        if trace.outcome not in (None, "success"):
            root.set_status(self._otel.Status(self._otel.StatusCode.ERROR, trace.outcome))
        root.end(end_time=_ns(end if end is not None else trace.arrival))

    def close(self) -> None:
        try:
            self.provider.force_flush(timeout_millis=3000)
            self.provider.shutdown()
        except Exception:                  # a collector that is gone must not block shutdown
            log.exception("tracing: flushing spans failed")


def new_span_exporter(endpoint: str) -> Optional[SpanExporter]:
    """None when tracing is off (empty endpoint): the SDK is then never imported."""
    return SpanExporter(endpoint) if endpoint else None
