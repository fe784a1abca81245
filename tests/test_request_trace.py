"""Request phases (router side) and their export as OpenTelemetry spans over OTLP/HTTP."""
import uuid

import pytest

from cluster.router.request_trace import PHASES, RecentRequests, RequestTrace


def pd_trace(t0: float = 1000.0) -> RequestTrace:
    tr = RequestTrace(uuid.uuid4().hex, "m", "pd", arrival=t0)
    tr.mark("dispatched", t0 + 0.001, attempt=1)
    tr.merge_worker_marks({"prefill_launched": [t0 + 0.010, {"forward_iter": 7}],
                           "prefill_done": [t0 + 0.050, {"forward_iter": 7, "num_tokens": 12}]},
                          "prefill-0")
    tr.merge_worker_marks({"kv_received": [t0 + 0.060, {"bytes": 4096, "backend": "zmq"}],
                           "first_decode_launched": [t0 + 0.065, {"forward_iter": 3}],
                           "first_decode_done": [t0 + 0.080, {"forward_iter": 3}]}, "decode-0")
    tr.add_tokens(1, None, t0 + 0.061)
    tr.add_tokens(1, 3, t0 + 0.081)
    tr.add_tokens(1, 4, t0 + 0.100)
    tr.finish("success", "length", t=t0 + 0.120)
    return tr


def test_phases_partition_end_to_end_latency_in_order():
    tr = pd_trace()
    phases = tr.phases()
    assert [p.name for p in phases] == list(PHASES)
    assert phases[0].start == tr.arrival and phases[-1].end == tr.marks["finished"].t
    for a, b in zip(phases, phases[1:]):
        assert a.end == b.start
    assert sum(p.duration_s for p in phases) == pytest.approx(tr.e2e_s)
    by = {p.name: p for p in phases}
    assert by["prefill_forward"].attrs == {"worker": "prefill-0", "forward_iter": 7, "num_tokens": 12}
    assert by["kv_transfer"].attrs["bytes"] == 4096 and by["kv_transfer"].attrs["worker"] == "decode-0"
    assert by["first_decode"].attrs["forward_iter"] == 3


def test_marks_from_a_skewed_clock_are_clamped_never_backwards():
    tr = RequestTrace("r", "m", "pd", arrival=100.0)
    tr.mark("dispatched", 100.01)
    tr.merge_worker_marks({"prefill_launched": [99.0, {}], "prefill_done": [100.5, {}],
                           "kv_received": [250.0, {}]}, "w")
    tr.finish("success", "stop", t=101.0)
    phases = tr.phases()
    assert all(p.duration_s >= 0 for p in phases)
    assert phases[-1].end == 101.0 and sum(p.duration_s for p in phases) == pytest.approx(1.0)


def test_unified_request_has_no_kv_transfer_and_in_flight_phase_is_open():
    tr = RequestTrace("r", "m", "unified", arrival=10.0)
    tr.mark("dispatched", 10.1)
    tr.merge_worker_marks({"prefill_launched": [10.2, {}], "prefill_done": [10.3, {}],
                           "first_decode_launched": [10.4, {}]}, "unified-0")
    names = [p.name for p in tr.phases()]
    assert names == ["router_queue", "prefill_queue", "prefill_forward", "decode_queue",
                     "first_decode"]
    assert tr.phases()[-1].end is None and tr.to_json()["status"] == "in_flight"


def test_redispatch_drops_the_old_attempts_worker_marks():
    tr = RequestTrace("r", "m", "pd", arrival=10.0)
    tr.mark("dispatched", 10.1)
    tr.merge_worker_marks({"prefill_launched": [10.2, {}], "prefill_done": [10.3, {}]}, "p")
    tr.redispatch("worker decode-0 failed", attempt=2)
    tr.mark("dispatched", 10.5)
    assert [p.name for p in tr.phases()] == ["router_queue", "prefill_queue"]
    assert tr.phases()[0].duration_s == pytest.approx(0.5)
    assert tr.to_json()["events"][0]["name"] == "redispatch"


def test_a_failed_request_ends_in_the_phase_it_failed_in():
    tr = RequestTrace("r", "m", "pd", arrival=10.0)
    tr.mark("dispatched", 10.1)
    tr.merge_worker_marks({"prefill_launched": [10.2, {}]}, "prefill-0")
    tr.finish("error", error="worker prefill-0 failed", t=10.5)
    assert [p.name for p in tr.phases()] == ["router_queue", "prefill_queue", "prefill_forward"]
    rejected = RequestTrace("q", "m", "pd", arrival=10.0)
    rejected.finish("rejected", t=10.01)
    assert [p.name for p in rejected.phases()] == ["router_queue"]


def test_unknown_marks_are_refused_or_ignored():
    tr = RequestTrace("r", "m", "pd")
    with pytest.raises(ValueError):
        tr.mark("lunch")
    tr.merge_worker_marks({"lunch": [1.0, {}], "arrival": [0.0, {}]}, "w")
    assert set(tr.marks) == {"arrival"}


def test_recent_requests_ring_is_bounded():
    ring = RecentRequests(capacity=3)
    traces = [RequestTrace(str(i), "m", "pd") for i in range(5)]
    for t in traces:
        ring.add(t)
    assert len(ring) == 3 and ring.get("0") is None and ring.get("4") is traces[4]


def test_spans_arrive_at_an_otlp_http_receiver_with_phase_attributes():
    pytest.importorskip("opentelemetry.sdk")
    from cluster.router.otlp_export import SpanExporter
    from tests.otlp_receiver import OtlpReceiver
    receiver = OtlpReceiver()
    exporter = SpanExporter(receiver.endpoint)
    try:
        tr = pd_trace()
        exporter.export(tr)
        spans = receiver.wait_for(tr.rid, {"request", *PHASES})
    finally:
        exporter.close()
        receiver.close()
    assert receiver.paths[0] == "/v1/traces"
    by = {s["name"]: s for s in spans}
    assert set(by) == {"request", *PHASES}
    root = by["request"]
    assert root["trace_id"] == tr.rid                      # the request id is the trace id
    assert root["attributes"]["pdcluster.request_id"] == tr.rid
    assert root["resource"]["service.name"] == "pdcluster"
    assert all(by[p]["parent_span_id"] == root["span_id"] for p in PHASES)
    assert by["prefill_forward"]["attributes"]["pdcluster.forward_iter"] == 7
    assert by["prefill_forward"]["attributes"]["pdcluster.worker"] == "prefill-0"
    assert by["kv_transfer"]["attributes"]["pdcluster.bytes"] == 4096
    assert by["first_decode"]["attributes"]["pdcluster.forward_iter"] == 3
    assert by["decode"]["start"] == pytest.approx(tr.arrival + 0.080, abs=1e-6)
    assert [e[1]["forward_iter"] for e in by["decode"]["events"]] == [3, 4]


def test_client_traceparent_makes_the_request_span_its_child():
    pytest.importorskip("opentelemetry.sdk")
    from cluster.router.otlp_export import SpanExporter
    from tests.otlp_receiver import OtlpReceiver
    receiver = OtlpReceiver()
    exporter = SpanExporter(receiver.endpoint)
    parent_trace, parent_span = "ab" * 16, "cd" * 8
    try:
        exporter.export(pd_trace(), traceparent=f"00-{parent_trace}-{parent_span}-01")
        spans = receiver.wait_for(parent_trace, {"request"})
    finally:
        exporter.close()
        receiver.close()
    root = next(s for s in spans if s["name"] == "request")
    assert root["parent_span_id"] == parent_span
