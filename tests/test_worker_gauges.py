"""Worker metrics exist only as `WorkerGauges` declares them: the router exports each with its
declared kind and help, a role's unreported (None) metric is absent, and a name nobody declared
cannot be built or sent."""
from __future__ import annotations

import dataclasses

import msgpack
import pytest

from cluster.router.metrics import RouterMetrics, WorkerStatsCollector
from cluster.wire import protocol as P
from cluster.wire.gauges import COUNTER, GAUGE, HISTOGRAM, WorkerGauges

SAMPLE = {GAUGE: 1.5, COUNTER: 3, HISTOGRAM: P.HistogramSample("h", [0.1], [1, 0], 0.05, 1)}


def every_metric_reported() -> WorkerGauges:
    return WorkerGauges(**{d.name: {"checksum": 2} if d.label else SAMPLE[d.kind]
                           for d in WorkerGauges.declared()})


def scrape(gauges: WorkerGauges) -> str:
    metrics = RouterMetrics()
    metrics.add_collector(WorkerStatsCollector(lambda: [("decode", "decode-0", gauges)], dict, dict))
    return metrics.render().decode()


def test_every_declared_metric_is_exported_with_its_kind_and_help():
    text = scrape(every_metric_reported())
    for d in WorkerGauges.declared():
        assert f"# TYPE pdcluster:{d.name} {d.kind}" in text
        assert f"# HELP pdcluster:{d.name} {d.help}" in text
    assert 'pdcluster:kv_transfer_failures_total{reason="checksum",role="decode",worker="decode-0"} 2.0' in text


def test_a_metric_the_role_does_not_report_is_absent():
    text = scrape(WorkerGauges(num_running_reqs=2))
    assert 'pdcluster:num_running_reqs{role="decode",worker="decode-0"} 2.0' in text
    assert "pdcluster:num_bootstrap_reqs" not in text and "pdcluster:kv_transfer_seconds" not in text


def test_an_undeclared_metric_cannot_be_built_or_sent():
    with pytest.raises(TypeError):
        WorkerGauges(num_runing_reqs=1)                     # the typo is the point
    body = P.encode(P.Heartbeat("decode-0", 1, WorkerGauges()))
    head = msgpack.unpackb(body[0])
    head["gauges"]["num_runing_reqs"] = 1
    with pytest.raises(P.ProtocolError, match="num_runing_reqs"):
        P.decode([msgpack.packb(head)])


def test_declaration_lists_every_field_once():
    names = [d.name for d in WorkerGauges.declared()]
    assert names == [f.name for f in dataclasses.fields(WorkerGauges)] and len(set(names)) == len(names)
