"""Prometheus text exposition (format 0.0.4) for the router's own metrics and the workers'.

Router: `pdcluster:time_to_first_token_seconds`, `pdcluster:inter_token_latency_seconds`,
`pdcluster:e2e_request_latency_seconds` (histograms), `pdcluster:requests_total{outcome}`,
`pdcluster:num_requests_in_flight`. Workers: every numeric heartbeat stat `S` becomes
`pdcluster:S{role,worker}` - a counter when `S` ends in `_total`, else a gauge - except the
KV transfer histogram, sent as `kv_transfer_seconds_bucket_<le>` (cumulative counts),
`kv_transfer_seconds_sum` and `kv_transfer_seconds_count`, which is exported as one real
histogram, and `{reason: count}` stats ending in `_total`, exported with a `reason` label
(`pdcluster:rejected_frames_total{reason}`). `pdcluster:worker_up{role,worker}` is 1 for every registered, live worker.
"""
from __future__ import annotations

import bisect
import math
import re
import threading
from collections import Counter

PREFIX = "pdcluster:"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0)
OUTCOMES = ("success", "error", "timeout", "aborted", "rejected")
HISTOGRAM_STATS = ("kv_transfer_seconds",)
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


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)    # last: above every bound
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {PREFIX}{self.name} {self.help}", f"# TYPE {PREFIX}{self.name} histogram"]
        cumulative = 0
        for le, n in zip(self.buckets + (math.inf,), self.counts):
            cumulative += n
            lines.append(f'{PREFIX}{self.name}_bucket{{le="{format_value(le)}"}} {cumulative}')
        lines.append(f"{PREFIX}{self.name}_sum {format_value(self.sum)}")
        lines.append(f"{PREFIX}{self.name}_count {self.count}")
        return lines


class RouterMetrics:
    """Router-side histograms and outcome counters; observed from the event loop thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram("time_to_first_token_seconds",
                              "Time from request arrival to its first token.", TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds",
                             "Time between consecutive output tokens.", ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds",
                             "Time from request arrival to its last token.", E2E_BUCKETS)
        self.outcomes: Counter = Counter({o: 0 for o in OUTCOMES})

    def observe(self, histogram: Histogram, value: float, times: int = 1) -> None:
        with self._lock:
            for _ in range(times):
                histogram.observe(value)

    def count_outcome(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1

    def render(self, num_in_flight: int) -> list[str]:
        with self._lock:
            lines = self.ttft.render() + self.itl.render() + self.e2e.render()
            lines += [f"# HELP {PREFIX}requests_total Finished requests by outcome.",
                      f"# TYPE {PREFIX}requests_total counter"]
            lines += [f'{PREFIX}requests_total{{outcome="{o}"}} {n}'
                      for o, n in sorted(self.outcomes.items())]
        lines += [f"# HELP {PREFIX}num_requests_in_flight Requests admitted and not finished.",
                  f"# TYPE {PREFIX}num_requests_in_flight gauge",
                  f"{PREFIX}num_requests_in_flight {num_in_flight}"]
        return lines


def render_worker_stats(workers: list[tuple[str, str, dict]]) -> list[str]:
    """Prometheus lines for [(role, worker_id, stats)], grouped by metric name."""
    samples: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    for role, worker_id, stats in workers:
        labels = {"role": role, "worker": worker_id}
        name = f"{PREFIX}worker_up"
        types[name] = "gauge"
        samples.setdefault(name, []).append(f"{name}{format_labels(labels)} 1")
        for base in HISTOGRAM_STATS:
            _histogram_from_stats(base, stats, labels, samples, types)
        for key, value in stats.items():
            if any(key.startswith(b) for b in HISTOGRAM_STATS) or not _NAME.fullmatch(key):
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
    lines = []
    for name in sorted(samples):
        lines.append(f"# TYPE {name} {types[name]}")
        lines += samples[name]
    return lines


def labeled_counter(name: str, labels: dict, counts: dict) -> list[str]:
    """`name{labels...,reason=R} N` per reason: a stat sent as {reason: count}."""
    return [f"{name}{format_labels({**labels, 'reason': str(r)})} {format_value(n)}"
            for r, n in sorted(counts.items()) if isinstance(n, (int, float))]


def _histogram_from_stats(base: str, stats: dict, labels: dict, samples: dict, types: dict):
    prefix = f"{base}_bucket_"
    buckets = []
    for key, value in stats.items():
        if key.startswith(prefix) and isinstance(value, (int, float)):
            try:
                buckets.append((float(key[len(prefix):]), value))
            except ValueError:
                continue
    count = stats.get(f"{base}_count")
    total = stats.get(f"{base}_sum")
    if count is None and not buckets:
        return
    name = PREFIX + base
    types[name] = "histogram"
    buckets.sort()
    if not buckets or not math.isinf(buckets[-1][0]):
        buckets.append((math.inf, count if count is not None else buckets[-1][1]))
    out = samples.setdefault(name, [])
    for le, n in buckets:
        out.append(f"{name}_bucket{format_labels({**labels, 'le': format_value(le)})} "
                   f"{format_value(n)}")
    out.append(f"{name}_sum{format_labels(labels)} {format_value(total or 0.0)}")
    out.append(f"{name}_count{format_labels(labels)} {format_value(count or buckets[-1][1])}")
