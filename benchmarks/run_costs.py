"""What a measured run itself paid, read back from the cluster (for benchmarks/plan_check.py).

- `phase_means`: each router phase's mean over the run's requests: where a TTFT went.
- `run_profile`: a profile (cluster/plan/costs.py's format) fitted from the run's own steps:
  prefill forwards from the router's phases (one sample per forward: its requests' tokens,
  its duration) and decode steps from the decode worker's `Decode batch [N]` lines (the time
  between consecutive busy iterations, the mean per batch size). Its steps ran under the run's real co-running and load,
  so its co-run factors are 1. A prediction from it tests the simulator's scheduling rules
  alone: what is left between it and the measurement is not the profile's noise. (Where a
  run's forwards all have one length, the fit is the least-norm line through their mean.)
"""
from __future__ import annotations

import re
import statistics

import httpx

from benchmarks.common import log_time

PHASES = ("router_queue", "prefill_queue", "prefill_forward", "kv_transfer", "decode_queue", "first_decode")
DECODE_LINE = re.compile(r"Decode batch \[(\d+)\], #running-req: (\d+), #token: (\d+)")


def fetch_traces(base_url: str, request_ids: list) -> list[dict]:
    return [httpx.get(f"{base_url}/debug/requests/{rid}", timeout=30).json() for rid in request_ids if rid]


def phase_means(traces: list[dict]) -> dict:
    """Mean ms of each router phase, and of the router's own TTFT (arrival to first token event)."""
    spans: dict[str, list[float]] = {}
    for trace in traces:
        for p in trace.get("phases", ()):
            spans.setdefault(p["phase"], []).append(p["duration_s"])
        if trace.get("tokens"):
            spans.setdefault("router_ttft", []).append(trace["tokens"][0]["t_s"])
    return {k: round(statistics.mean(spans[k]) * 1e3, 1) for k in (*PHASES, "router_ttft") if k in spans}


def prefill_samples(traces: list[dict]) -> list[list[float]]:
    """(tokens, seconds) per prefill forward. The phase runs from the batch's launch to its
    result; under overlap a batch launched while another runs waits for it, so a forward's own
    time starts at the later of its launch and the previous forward's end."""
    forwards: dict[int, list] = {}
    for trace in traces:
        for p in trace.get("phases", ()):
            if p["phase"] == "prefill_forward" and p.get("forward_iter") is not None:
                t0 = trace["arrival_unix_s"]
                tokens, start, end = forwards.get(p["forward_iter"], (0, t0 + p["start_s"], t0 + p["end_s"]))
                forwards[p["forward_iter"]] = (tokens + p["num_tokens"], start, end)
    out, previous_end = [], 0.0
    for _, (tokens, start, end) in sorted(forwards.items()):
        out.append([tokens, end - max(start, previous_end)])
        previous_end = end
    return out


def first_decode_iters(traces: list[dict]) -> dict[int, int]:
    """forward_iter -> how many requests had their first decode step in it."""
    out: dict[int, int] = {}
    for trace in traces:
        for p in trace.get("phases", ()):
            if p["phase"] == "decode_queue" and p.get("forward_iter") is not None:
                out[p["forward_iter"]] = out.get(p["forward_iter"], 0) + 1
    return out


def decode_samples(log_text: str, traces: list[dict], start: float, end: float) -> list[list[float]]:
    """(batch, context tokens, mean seconds) per batch size, from consecutive `Decode batch [N]`
    lines. A step counts only when a request of its batch was also in the step before (the
    worker was busy throughout, so the gap is one step, not an idle spell and a step). The mean,
    not the median: a TPOT is a sum of steps, and a shared machine's steps are skewed."""
    new_in = first_decode_iters(traces)
    steps = []                                   # (batch, context tokens, seconds)
    last = None
    for line in log_text.splitlines():
        m, t = DECODE_LINE.search(line), log_time(line)
        if not m or t is None or not start <= t <= end:
            continue
        it, batch, context = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if last is not None and it == last[0] + 1 and new_in.get(it, 0) < batch:
            steps.append((batch, context, t - last[1]))
        last = (it, t)
    by_batch: dict[int, list] = {}
    for batch, context, seconds in steps:
        by_batch.setdefault(batch, []).append((context, seconds))
    return [[b, statistics.mean(c for c, _ in rows), statistics.mean(s for _, s in rows)]
            for b, rows in sorted(by_batch.items())]


def run_profile(traces: list[dict], decode_log: str, start: float, end: float, base: dict) -> dict:
    """`base`: a measured profile, for what the run does not show apart (transfer, limits)."""
    return {**base, "prefill": prefill_samples(traces), "decode": decode_samples(decode_log, traces, start, end),
            "co_run": {"prefill": 1.0, "decode": 1.0}}
