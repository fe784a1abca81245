"""Predicted goodput of a layout: the highest request rate at which at least `attainment`
of a workload's requests meet both SLO targets in the simulation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from cluster.bench.report import percentile
from cluster.plan.costs import CostModel
from cluster.plan.simulate import Layout, SimRequest, simulate
from cluster.plan.workload import Workload

RATE_STEP = 1.1                     # the default search grid: 0.05 req/s, then 10% apart
MAX_RATE = 10000.0


@dataclass(frozen=True)
class Slo:
    ttft: Optional[float] = None
    tpot: Optional[float] = None

    def met_by(self, r) -> bool:
        return ((self.ttft is None or r.ttft <= self.ttft) and
                (self.tpot is None or r.tpot is None or r.tpot <= self.tpot))


@dataclass(frozen=True)
class Limits:
    max_prefill_tokens: int = 4096
    max_running: int = 64


def run_at(layout: Layout, costs: CostModel, workload: Workload, rate: float,
           limits: Limits = Limits()) -> list[SimRequest]:
    return simulate(layout, costs, workload.requests(rate), max_prefill_tokens=limits.max_prefill_tokens,
                    max_running=limits.max_running)


def attainment(layout: Layout, costs: CostModel, workload: Workload, slo: Slo, rate: float,
               limits: Limits = Limits()) -> float:
    done = run_at(layout, costs, workload, rate, limits)
    return sum(slo.met_by(r) for r in done) / len(done)


def predict(layout: Layout, costs: CostModel, workload: Workload, slo: Slo, rate: float,
            limits: Limits = Limits()) -> dict:
    """One rate's predicted figures under `pdcluster bench --request-rate`'s names (ms)."""
    done = run_at(layout, costs, workload, rate, limits)
    ttfts = [r.ttft * 1e3 for r in done]
    tpots = [r.tpot * 1e3 for r in done if r.tpot is not None]
    return {"rate": rate, "num_requests": len(done),
            "slo_attainment": round(sum(slo.met_by(r) for r in done) / len(done), 4),
            "median_ttft_ms": round(percentile(ttfts, 50), 3), "p90_ttft_ms": round(percentile(ttfts, 90), 3),
            "p99_ttft_ms": round(percentile(ttfts, 99), 3),
            "mean_tpot_ms": round(sum(tpots) / len(tpots), 3) if tpots else None}


def default_rates():
    rate = 0.05
    while rate <= MAX_RATE:
        yield rate
        rate *= RATE_STEP


def goodput(layout: Layout, costs: CostModel, workload: Workload, slo: Slo, *,
            rates: Optional[Sequence[float]] = None, share: float = 0.9,
            limits: Limits = Limits()) -> Optional[float]:
    """The highest rate of `rates` (ascending; default a 10% grid) meeting the SLO for `share`
    of requests; the search stops at two failing rates in a row."""
    best, misses = None, 0
    for rate in rates if rates is not None else default_rates():
        if attainment(layout, costs, workload, slo, rate, limits) >= share:
            best, misses = rate, 0
        else:
            misses += 1
            if misses >= 2:                # past the knee, or a latency floor above the SLO
                break
    return best
