"""A worker's histogram: a `prometheus_client.Histogram` outside any registry, sent with
each heartbeat as a typed `HistogramSample` that the router's collector exposes with the
worker's labels (cluster/router/metrics.py).
"""
from __future__ import annotations

import math

from prometheus_client import Histogram as _PromHistogram

from cluster.wire.messages import HistogramSample


class Histogram:
    def __init__(self, name: str, bounds: tuple):
        self.name, self.bounds = name, tuple(bounds)
        self._h = _PromHistogram(name, name, buckets=self.bounds, registry=None)

    def observe(self, value: float, times: int = 1) -> None:
        for _ in range(times):
            self._h.observe(value)

    def sample(self) -> HistogramSample:
        """Per-bucket counts (not cumulative; the last above every bound), sum and count."""
        cumulative, total = [], 0.0
        for s in self._h.collect()[0].samples:
            if s.name.endswith("_bucket"):
                cumulative.append((float(s.labels["le"]), int(s.value)))
            elif s.name.endswith("_sum"):
                total = s.value
        cumulative.sort(key=lambda b: b[0])
        counts = [n - (cumulative[i - 1][1] if i else 0) for i, (_, n) in enumerate(cumulative)]
        assert math.isinf(cumulative[-1][0])
        return HistogramSample(self.name, list(self.bounds), counts, total, cumulative[-1][1])
