"""How much prefill and decode slow each other when their workers share a host's compute.

On a CPU cluster (or GPUs whose host threads contend) a prefill forward that runs while the
decode worker steps is slower than one alone, and so are the decode steps it overlaps; a
profile of each role alone misses that. `pdcluster profile` measures both factors on the
cluster it profiles, from the router's per-request phases:
- prefill: the median `prefill_forward` of prompts sent one after another while decode
  requests are decoding, over the median of the same prompts alone (sent just before);
- decode: the median gap between the decode requests' tokens while a prompt's forward runs,
  over the median gap while none runs.
Each factor is at least 1. The simulation (sim_workers.py) stretches a prefill step that
starts while a decode worker is busy by the prefill factor, and a decode step that starts
while a prefill worker is busy by the decode factor. Workers on separate devices measure
factors near 1, and a profile without them (older ones) means 1.
"""
from __future__ import annotations

import asyncio
import statistics

CO_RUN_DECODES = 2                 # decode requests kept running while the prompts go
CO_RUN_TOKENS = 48                 # their output tokens: long enough to outlast a few prompts


def _absolute(trace: dict, t: float) -> float:
    return trace["arrival_unix_s"] + t


def _forward_window(trace: dict) -> tuple[float, float]:
    phase = next(p for p in trace["phases"] if p["phase"] == "prefill_forward")
    return _absolute(trace, phase["start_s"]), _absolute(trace, phase["end_s"])


def _token_times(trace: dict) -> list[float]:
    return [_absolute(trace, t["t_s"]) for t in trace["tokens"]]


def co_run_factors(alone: list[dict], prompts: list[dict], decodes: list[dict]) -> dict:
    """The factors from traces: prompts alone, prompts sent while `decodes` ran, the decodes."""
    decode_steps = [ts[1:] for ts in map(_token_times, decodes)]     # after each first token
    start = max(ts[0] for ts in decode_steps)
    end = min(ts[-1] for ts in decode_steps)
    windows = [w for w in map(_forward_window, prompts) if start <= w[0] and w[1] <= end]
    inside, outside = [], []
    for ts in decode_steps:
        for a, b in zip(ts, ts[1:]):
            mid = (a + b) / 2
            (inside if any(s <= mid <= e for s, e in windows) else outside).append(b - a)
    prefill_alone = statistics.median(e - s for s, e in map(_forward_window, alone))
    factors = {"prefill": 1.0, "decode": 1.0}
    if windows:
        factors["prefill"] = max(1.0, statistics.median(e - s for s, e in windows) / prefill_alone)
    if inside and outside:
        factors["decode"] = max(1.0, statistics.median(inside) / statistics.median(outside))
    return {k: round(v, 3) for k, v in factors.items()}


async def measure_co_run(probe, prompt_tokens: int, repeats: int) -> dict:
    """`probe`: profile.Probe. Prompts of `prompt_tokens` alone, then while decodes run."""
    alone = [await probe.trace(prompt_tokens, 2) for _ in range(repeats)]
    decoding = asyncio.ensure_future(asyncio.gather(
        *(probe.trace(16, CO_RUN_TOKENS) for _ in range(CO_RUN_DECODES))))
    prompts = []
    while not decoding.done():
        prompts.append(await probe.trace(prompt_tokens, 2))
    return co_run_factors(alone, prompts, await decoding)
