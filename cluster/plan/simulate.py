"""A discrete-event simulation of one static layout under a cost model (costs.py).

The scheduling rules are the cluster's (the workers and their overlap loop: sim_workers.py):
a prefill worker takes FCFS batches of whole prompts up to `max_prefill_tokens` (at least one
prompt) once their decode worker has reserved pages; the KV moves to that decode worker
(transfer time from the profile), which commits the first token and runs continuous batching
(whoever it read joins a later step, up to `max_running`). A unified worker runs chunked
prefill mixed into its decode steps, so prompts slow the decodes they join. Requests go round
robin to prefill (or unified) workers, as the router's default policy, and to the decode
worker holding the fewest requests. A prefill or decode step that starts while a worker of
the other role is busy is stretched by the profile's co-run factor (co_run.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.plan.costs import CostModel
from cluster.plan.sim_workers import Clock, DecodeSim, PrefillSim, SimRequest, UnifiedSim

__all__ = ["Layout", "SimRequest", "layouts_for", "simulate"]


@dataclass(frozen=True)
class Layout:
    """Workers per role and the tensor-parallel ranks (GPUs) of each of a role's workers."""
    prefill: int = 0
    decode: int = 0
    unified: int = 0
    prefill_tp: int = 1
    decode_tp: int = 1
    unified_tp: int = 1

    @property
    def name(self) -> str:
        tp = lambda t: f"(tp{t})" if t > 1 else ""      # noqa: E731
        if self.unified:
            return f"unified x{self.unified}{tp(self.unified_tp)}"
        return f"{self.prefill}P{tp(self.prefill_tp)}{self.decode}D{tp(self.decode_tp)}"

    @property
    def gpus(self) -> int:
        return self.prefill * self.prefill_tp + self.decode * self.decode_tp + self.unified * self.unified_tp


def layouts_for(gpus: int, tps: tuple[int, ...] = (1,)) -> list[Layout]:
    """Every static layout of `gpus` GPUs whose workers have a tp of `tps`: all unified (one tp),
    or xPyD (a tp for the prefill workers, one for the decode workers) using every GPU."""
    out = [Layout(unified=gpus // t, unified_tp=t) for t in tps if gpus % t == 0]
    for a in tps:
        for b in tps:
            out += [Layout(x, (gpus - x * a) // b, prefill_tp=a, decode_tp=b) for x in range(1, gpus // a + 1)
                    if gpus - x * a > 0 and (gpus - x * a) % b == 0]
    return out


def simulate(layout: Layout, costs: CostModel, requests: list[SimRequest], *,
             max_prefill_tokens: int = 4096, max_running: int = 64) -> list[SimRequest]:
    """Run `requests` (arrival times set) through `layout`; they come back finished."""
    clock = Clock()
    if layout.unified:
        unified = [UnifiedSim(clock, costs.for_tp(layout.unified_tp), max_running, max_prefill_tokens)
                   for _ in range(layout.unified)]
        for i, r in enumerate(requests):
            clock.at(r.arrival, lambda r=r, w=unified[i % len(unified)]: w.admit(r))
    else:
        decode = [DecodeSim(clock, costs.for_tp(layout.decode_tp), max_running) for _ in range(layout.decode)]
        prefill = [PrefillSim(clock, costs.for_tp(layout.prefill_tp), max_prefill_tokens)
                   for _ in range(layout.prefill)]
        for w in prefill:
            w.others = decode
        for w in decode:
            w.others = prefill
        for i, r in enumerate(requests):
            clock.at(r.arrival, lambda r=r, p=prefill[i % len(prefill)]: p.admit(r, min(decode, key=lambda d: d.load)))
    clock.run()
    return requests
