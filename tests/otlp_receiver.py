"""An in-process OTLP/HTTP trace receiver (a collector stub) for tests.

Accepts `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`, as the official
exporter sends it, and keeps every span as a flat dict (name, trace/span ids, times,
attributes), so a test can assert what a real collector would have received.
"""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class OtlpReceiver:
    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse)
        receiver = self
        self.spans: list[dict] = []
        self.paths: list[str] = []
        self._cond = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.paths.append(self.path)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                receiver._add(req)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _add(self, req) -> None:
        with self._cond:
            for rs in req.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append({
                            "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "start": s.start_time_unix_nano / 1e9, "end": s.end_time_unix_nano / 1e9,
                            "attributes": {a.key: _value(a.value) for a in s.attributes},
                            "events": [(e.name, {a.key: _value(a.value) for a in e.attributes})
                                       for e in s.events],
                            "status": s.status.code, "resource": resource})
            self._cond.notify_all()

    def wait_for(self, trace_id: str, names: set, timeout: float = 60.0) -> list[dict]:
        """The spans of `trace_id` once all of `names` arrived (or what came by the timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [s for s in self.spans if s["trace_id"] == trace_id]
                if names <= {s["name"] for s in got} or time.monotonic() >= deadline:
                    return got
                self._cond.wait(0.2)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
