"""The router's `/metrics`, exported with `prometheus_client` (what vLLM and SGLang use).

Router: `pdcluster:time_to_first_token_seconds`, `pdcluster:inter_token_latency_seconds`,
`pdcluster:e2e_request_latency_seconds`, `pdcluster:request_phase_seconds{phase}`
(histograms), `pdcluster:requests_total{outcome}`, `pdcluster:num_requests_in_flight`,
`pdcluster:router_cpu_seconds_total{process}` ("router", and "frontend-N" per HTTP front end:
their series are summed into the dispatcher's, so each request counts once).
Workers (labels `role`, `worker`), read from their last heartbeat at scrape time by
`WorkerStatsCollector`: every metric `M` declared by `WorkerGauges` (cluster/wire/gauges.py)
that a worker reports becomes `pdcluster:M` of the declared kind (a labelled counter's
{reason: n} adds a `reason` label); `pdcluster:worker_up`
is 1 for every live worker and `pdcluster:worker_restarts_total` counts how often a
worker id registered again. Each router owns its registry (tests run several in one process).
"""
from __future__ import annotations

import math
import time
from bisect import bisect_left
from typing import Callable, Iterable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from cluster.router.request_trace import PHASES
from cluster.wire.frontend_messages import MetricSample
from cluster.wire.gauges import COUNTER, GAUGE, HISTOGRAM, MetricDecl, WorkerGauges

disable_created_metrics()          # no `_created` series: not among the documented names
PREFIX = "pdcluster:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0)
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0, 60.0, 120.0, 480.0)
OUTCOMES = ("success", "error", "timeout", "aborted", "rejected")
WORKER_METRICS = {d.name: d for d in WorkerGauges.declared()}
ROUTER_SERIES = frozenset(PREFIX + n for n in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                                               "e2e_request_latency_seconds", "request_phase_seconds", "requests"))
_FAMILIES = {GAUGE: GaugeMetricFamily, COUNTER: CounterMetricFamily, HISTOGRAM: HistogramMetricFamily}


class RouterMetrics:
    """The router's own histograms and counters, in its own registry."""

    def __init__(self, num_in_flight: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from request arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = LoopHistogram(PREFIX + "inter_token_latency_seconds",
                                 "Time between consecutive output tokens.", ITL_BUCKETS, r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Time from request arrival to its last token.", buckets=E2E_BUCKETS,
                             registry=r)
        self.phase = Histogram(PREFIX + "request_phase_seconds",
                               "Time a successful request spent in each phase (they add up "
                               "to its end-to-end latency).", ["phase"], buckets=PHASE_BUCKETS,
                               registry=r)
        self.requests = Counter(PREFIX + "requests", "Finished requests by outcome.", ["outcome"],
                                registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for phase in PHASES:
            self.phase.labels(phase)
        Gauge(PREFIX + "num_requests_in_flight", "Requests admitted and not finished.",
              registry=r).set_function(num_in_flight)
        r.register(RouterCpuCollector())
        self.frontends = None             # the dispatcher's FrontendHub: its front ends' series join ours

    def observe(self, histogram: Histogram, value: float, times: int = 1) -> None:
        for _ in range(times):
            histogram.observe(value)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.phase.labels(phase).observe(seconds)

    def count_outcome(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def add_collector(self, collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        if self.frontends is None:
            return generate_latest(self.registry)
        return generate_latest(_WithFrontends(self.registry, self.frontends))

    def samples(self) -> list[MetricSample]:
        """The router series (ROUTER_SERIES) as they stand: what a front end reports."""
        return [MetricSample(s.name, dict(s.labels), s.value) for family in self.registry.collect()
                if family.name in ROUTER_SERIES for s in family.samples]


class LoopHistogram:
    """A histogram observed from one thread only (the HTTP event loop), exported exactly as
    prometheus_client's Histogram is. It is observed once per streamed token: a list bump
    costs ~0.1 µs where Histogram.observe takes two locks (~1.2 µs)."""

    def __init__(self, name: str, documentation: str, buckets: tuple, registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = [float(b) for b in buckets] + [math.inf]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1     # le: value <= bound
        self.sum += value

    def collect(self) -> Iterable:
        cumulative, total = [], 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            cumulative.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self.sum)


class _WithFrontends:
    """This registry's families with the front ends' router series added to its own (each
    request was counted by the one front end that served it) and a CPU sample per front end."""

    def __init__(self, registry: CollectorRegistry, frontends):
        self.registry, self.frontends = registry, frontends

    def collect(self) -> Iterable:
        added, cpu = self.frontends.summed_samples(), self.frontends.cpu_seconds()
        for family in self.registry.collect():
            if family.name in ROUTER_SERIES:
                family.samples = [s._replace(value=s.value + added.get((s.name, tuple(sorted(s.labels.items()))), 0))
                                  for s in family.samples]
            elif family.name == PREFIX + "router_cpu_seconds":
                for frontend_id, seconds in cpu.items():
                    family.add_metric([frontend_id], seconds)
            yield family


class RouterCpuCollector:
    """The router process's CPU time (user + system, every thread), read at scrape time: its
    rate over the delivered tokens is the host cost of streaming. `process` is "router" (the
    one process, or the dispatcher behind front ends); each front end adds its own
    (`frontend-N`, from its reports)."""

    def collect(self) -> Iterable:
        family = CounterMetricFamily(PREFIX + "router_cpu_seconds", "CPU time (user + system) each "
                                     "router process has used.", labels=["process"])
        family.add_metric(["router"], time.process_time())
        yield family


class WorkerStatsCollector:
    """Workers' heartbeat gauges as metric families, read at scrape time; each family's kind,
    help and label come from the `WorkerGauges` declaration.

    `snapshot()` -> [(role, worker_id, WorkerGauges)];
    `restarts()` -> {worker_id: (role, n)}; `router_rejected()` -> {reason: n}.
    """

    def __init__(self, snapshot: Callable[[], list], restarts: Callable[[], dict],
                 router_rejected: Callable[[], dict]):
        self.snapshot, self.restarts, self.router_rejected = snapshot, restarts, router_rejected

    def collect(self) -> Iterable:
        labels = ["role", "worker"]
        families: dict[str, object] = {}              # only metrics some worker reported

        def family(decl: MetricDecl):
            if decl.name not in families:
                families[decl.name] = _FAMILIES[decl.kind](PREFIX + decl.name, decl.help,
                                                           labels=labels + [decl.label] * bool(decl.label))
            return families[decl.name]

        up = GaugeMetricFamily(PREFIX + "worker_up", "1 for every registered, live worker.",
                               labels=labels)
        for role, worker_id, gauges in self.snapshot():
            values = [role, worker_id]
            up.add_metric(values, 1)
            for decl, value in gauges.reported():
                if decl.kind == HISTOGRAM:
                    family(decl).add_metric(values, _cumulative(value), value.sum)
                elif decl.label:
                    labelled = family(decl)   # declared even before its first sample: dashboards query it
                    for label, n in sorted(value.items()):
                        labelled.add_metric(values + [str(label)], n)
                else:
                    family(decl).add_metric(values, value)
        rejected = self.router_rejected()
        if rejected:
            decl = WORKER_METRICS["rejected_frames_total"]
            for reason, n in sorted(rejected.items()):
                family(decl).add_metric(["router", "router", str(reason)], n)
        restarts = CounterMetricFamily(PREFIX + "worker_restarts_total",
                                       "Times a worker id registered again (a restarted worker).",
                                       labels=labels)
        for worker_id, (role, n) in sorted(self.restarts().items()):
            restarts.add_metric([role, worker_id], n)
        yield up
        yield restarts
        yield from families.values()


def _cumulative(h) -> list[tuple[str, float]]:
    out, total = [], 0
    for le, n in zip(list(h.bounds) + [math.inf], h.counts):
        total += n
        out.append(("+Inf" if math.isinf(le) else repr(float(le)), total))
    return out

