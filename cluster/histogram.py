"""Histogram: counts of observed values per bucket, kept where they are observed.

The router observes its latencies in these; a worker observes its KV transfer times and
sends `sample()` (a typed `HistogramSample`) with each heartbeat; the router renders both
the same way (`cluster.router.metrics.render_histogram`).
"""
from __future__ import annotations

import bisect

from cluster.wire.messages import HistogramSample


class Histogram:
    def __init__(self, name: str, bounds: tuple):
        self.name, self.bounds = name, tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)     # last: above every bound
        self.sum, self.count = 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def sample(self) -> HistogramSample:
        return HistogramSample(self.name, list(self.bounds), list(self.counts), self.sum, self.count)
