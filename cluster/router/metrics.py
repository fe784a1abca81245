"""Prometheus text exposition (format 0.0.4) for the router's own metrics and the workers'.

Router: `pdcluster:time_to_first_token_seconds`, `pdcluster:inter_token_latency_seconds`,
`pdcluster:e2e_request_latency_seconds` (histograms), `pdcluster:requests_total{outcome}`,
`pdcluster:num_requests_in_flight`. Workers: every numeric heartbeat stat `S` becomes
`pdcluster:S{role,worker}` - a counter when `S` ends in `_total`, else a gauge; a
`{reason: count}` stat ending in `_total` is a counter with a `reason` label
(`pdcluster:rejected_frames_total{reason}`); every histogram a heartbeat carries (typed
`HistogramSample`s, e.g. prefill's `kv_transfer_seconds`) is exported as a histogram with
the same labels. `pdcluster:worker_up{role,worker}` is 1 for every registered, live worker.
"""
from __future__ import annotations

import math
import re
import threading
from collections import Counter

from cluster.histogram import Histogram
from cluster.wire.messages import HistogramSample

PREFIX = "pdcluster:"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0)
OUTCOMES = ("success", "error", "timeout", "aborted", "rejected")
HELP = {"time_to_first_token_seconds": "Time from request arrival to its first token.",
        "inter_token_latency_seconds": "Time between consecutive output tokens.",
        "e2e_request_latency_seconds": "Time from request arrival to its last token."}
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def format_value(v: float) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def format_labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
           for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc)) + "}"


def render_histogram(sample: HistogramSample, labels: dict) -> list[str]:
    """The `_bucket` (cumulative), `_sum` and `_count` lines of one histogram sample."""
    name, lines, cumulative = PREFIX + sample.name, [], 0
    for le, n in zip(list(sample.bounds) + [math.inf], sample.counts):
        cumulative += n
        lines.append(f"{name}_bucket{format_labels({**labels, 'le': format_value(le)})} {cumulative}")
    lines.append(f"{name}_sum{format_labels(labels)} {format_value(sample.sum)}")
    lines.append(f"{name}_count{format_labels(labels)} {sample.count}")
    return lines


class RouterMetrics:
    """Router-side histograms and outcome counters; observed from the event loop thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram("time_to_first_token_seconds", TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", E2E_BUCKETS)
        self.outcomes: Counter = Counter({o: 0 for o in OUTCOMES})

    def observe(self, histogram: Histogram, value: float, times: int = 1) -> None:
        with self._lock:
            histogram.observe(value, times)

    def count_outcome(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1

    def render(self, num_in_flight: int) -> list[str]:
        with self._lock:
            lines = []
            for h in (self.ttft, self.itl, self.e2e):
                lines += [f"# HELP {PREFIX}{h.name} {HELP[h.name]}", f"# TYPE {PREFIX}{h.name} histogram"]
                lines += render_histogram(h.sample(), {})
            lines += [f"# HELP {PREFIX}requests_total Finished requests by outcome.",
                      f"# TYPE {PREFIX}requests_total counter"]
            lines += [f'{PREFIX}requests_total{{outcome="{o}"}} {n}'
                      for o, n in sorted(self.outcomes.items())]
        lines += [f"# HELP {PREFIX}num_requests_in_flight Requests admitted and not finished.",
                  f"# TYPE {PREFIX}num_requests_in_flight gauge",
                  f"{PREFIX}num_requests_in_flight {num_in_flight}"]
        return lines


def render_worker_stats(workers: list[tuple[str, str, dict, list]]) -> list[str]:
    """Prometheus lines for [(role, worker_id, gauges, histogram samples)], grouped by name."""
    samples: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    for role, worker_id, stats, histograms in workers:
        labels = {"role": role, "worker": worker_id}
        name = f"{PREFIX}worker_up"
        types[name] = "gauge"
        samples.setdefault(name, []).append(f"{name}{format_labels(labels)} 1")
        for key, value in stats.items():
            if not _NAME.fullmatch(key):
                continue
            if isinstance(value, dict) and key.endswith("_total"):     # {reason: count}
                name = PREFIX + key
                types[name] = "counter"
                samples.setdefault(name, []).extend(labeled_counter(name, labels, value))
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = PREFIX + key
            types[name] = "counter" if key.endswith("_total") else "gauge"
            samples.setdefault(name, []).append(f"{name}{format_labels(labels)} "
                                                f"{format_value(value)}")
        for h in histograms:
            if _NAME.fullmatch(h.name):
                types[PREFIX + h.name] = "histogram"
                samples.setdefault(PREFIX + h.name, []).extend(render_histogram(h, labels))
    lines = []
    for name in sorted(samples):
        lines.append(f"# TYPE {name} {types[name]}")
        lines += samples[name]
    return lines


def labeled_counter(name: str, labels: dict, counts: dict) -> list[str]:
    """`name{labels...,reason=R} N` per reason: a stat sent as {reason: count}."""
    return [f"{name}{format_labels({**labels, 'reason': str(r)})} {format_value(n)}"
            for r, n in sorted(counts.items()) if isinstance(n, (int, float))]
