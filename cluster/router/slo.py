"""SLO attainment over a sliding window of finished requests (the `[slo]` targets).

Each successful request is judged on the TTFT and TPOT the router measured for it: TTFT from
arrival to its first token, TPOT the mean time per output token after the first
((finish - first token) / (tokens - 1); a one-token answer has no TPOT to miss). An unset
target is always met. Exported at scrape time: `pdcluster:slo_attainment{kind}` (the share of
the window's requests meeting the TTFT target, the TPOT target, both) and
`pdcluster:slo_goodput` (requests meeting both, per second of window); a window with no
finished request exports no samples.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from prometheus_client.core import GaugeMetricFamily

from cluster.config import SloConfig
from cluster.router.metrics import PREFIX

KINDS = ("ttft", "tpot", "both")


@dataclass(frozen=True, slots=True)
class Judged:
    finished_at: float
    ttft_met: bool
    tpot_met: bool
    ttft: float
    tpot: Optional[float]


def meets(value: Optional[float], target: Optional[float]) -> bool:
    return target is None or value is None or value <= target


def request_tpot(first_token_at: float, finished_at: float, num_tokens: int) -> Optional[float]:
    """Mean seconds per output token after the first; None for a one-token answer."""
    return (finished_at - first_token_at) / (num_tokens - 1) if num_tokens > 1 else None


def _nearest_rank(values: list[float], q: float) -> Optional[float]:
    """The smallest value with at least q% of `values` at or below it."""
    if not values:
        return None
    ranked = sorted(values)
    return ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]


class SloWindow:
    """The last `slo.window` seconds of finished requests, judged against `slo`'s targets."""

    def __init__(self, slo: SloConfig, clock: Callable[[], float] = time.monotonic):
        self.slo, self.clock = slo, clock
        self._judged: deque[Judged] = deque()

    def observe(self, ttft: float, tpot: Optional[float]) -> None:
        self._judged.append(Judged(self.clock(), meets(ttft, self.slo.ttft), meets(tpot, self.slo.tpot),
                                   ttft, tpot))

    def _current(self) -> deque[Judged]:
        horizon = self.clock() - self.slo.window
        while self._judged and self._judged[0].finished_at < horizon:
            self._judged.popleft()
        return self._judged

    def attainment(self) -> dict[str, float]:
        """{kind: share of the window's requests meeting it}; {} for an empty window."""
        judged = self._current()
        if not judged:             # no requests is not 100% attainment
            return {}
        n = len(judged)
        return {"ttft": sum(j.ttft_met for j in judged) / n,
                "tpot": sum(j.tpot_met for j in judged) / n,
                "both": sum(j.ttft_met and j.tpot_met for j in judged) / n}

    def means(self) -> tuple[Optional[float], Optional[float]]:
        """(mean TTFT, mean TPOT) of the window's requests; None where there is none."""
        judged = self._current()
        tpots = [j.tpot for j in judged if j.tpot is not None]
        return (sum(j.ttft for j in judged) / len(judged) if judged else None,
                sum(tpots) / len(tpots) if tpots else None)

    def percentiles(self, q: float) -> tuple[Optional[float], Optional[float]]:
        """(TTFT, TPOT) at percentile `q` (0-100, nearest rank) of the window's requests; None where
        there is none."""
        judged = self._current()
        return (_nearest_rank([j.ttft for j in judged], q),
                _nearest_rank([j.tpot for j in judged if j.tpot is not None], q))

    def goodput(self) -> float:
        """Requests per second of window that met both targets."""
        return sum(j.ttft_met and j.tpot_met for j in self._current()) / self.slo.window

    def collect(self) -> Iterable:
        window = f"the last {self.slo.window:g} s of finished requests"
        attained = GaugeMetricFamily(PREFIX + "slo_attainment", "Share of " + window + " that "
                                     "met the [slo] target of each kind (ttft, tpot, both).",
                                     labels=["kind"])
        for kind, share in self.attainment().items():
            attained.add_metric([kind], share)
        goodput = GaugeMetricFamily(PREFIX + "slo_goodput", "Requests per second over " + window
                                    + " that met both [slo] targets.")
        if self._judged:
            goodput.add_metric([], self.goodput())
        yield attained
        yield goodput
