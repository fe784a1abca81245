"""`pdcluster bench --request-rate R[,R..]`: open-loop Poisson arrivals, SLO attainment, goodput.

DistServe's study: requests arrive as a Poisson process at rate R (exponential gaps, seeded,
no cap on requests in flight: a slow server gets a growing queue, as in production); a request
meets the SLO when it succeeds, its first token comes within `--slo-ttft` and its mean
inter-token time, (e2e - ttft) / (tokens - 1), is within `--slo-tpot`. Per rate the report
gives the attainment (share meeting the SLO) and latency percentiles; the goodput is the
highest swept rate whose attainment reaches `--attainment` (default 90%). Each rate runs
long enough for a steady state: `--rate-seconds` (default 30) seconds of arrivals, that is
ceil(30 x rate) requests, unless `--num-requests` names the count; the output states each
rate's window (requests, seconds of arrivals). `--plot DIR` draws
attainment vs rate (`slo_attainment.png`), `--json FILE` writes every rate's figures, each
request's (TTFT, TPOT) included, so `attainment_at` can score a stored run against other SLOs,
and each request's router id (`request_ids`), so its phases can be read back from
`GET /debug/requests/{id}` while the router still holds them (its last 1,000 requests).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import time
from typing import Optional

from cluster.bench import report
from cluster.bench.client import api_client, cycled_prompt, one_request, relative_to, resolve_model

STEADY_SECONDS = 30.0          # arrivals per rate by default: past the ramp of a queue


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--request-rate", default=None, metavar="R[,R..]",
                   help="open loop: Poisson arrivals at R requests/s (a comma list sweeps the rates; "
                        "--num-requests per rate, --concurrency ignored)")
    p.add_argument("--attainment", type=float, default=0.9,
                   help="goodput: the highest rate where at least this share meets the SLO")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--rate-seconds", type=float, default=STEADY_SECONDS, metavar="S",
                   help="open loop: each rate sends S seconds of arrivals, ceil(S x rate) requests, "
                        "unless --num-requests is given")


def requests_at(rate: float, args) -> int:
    """How many requests one rate sends: --num-requests when given, else --rate-seconds of
    arrivals (a few seconds of a sweep measure the ramp, not the steady state)."""
    if args.num_requests:
        return args.num_requests
    return max(1, math.ceil(getattr(args, "rate_seconds", STEADY_SECONDS) * rate))


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--request-rate {text!r}: expected numbers like 1,2,4") from None
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"--request-rate {text!r}: rates must be > 0")
    return sorted(rates)


def arrival_times(rate: float, num: int, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run_rate(client, args, rate: float, prompts: list[str]) -> tuple[list[dict], float, float]:
    """One open-loop run: every request sent at its Poisson arrival time; (results, duration,
    seconds from the first arrival to the last)."""
    times = arrival_times(rate, len(prompts), args.seed)
    start = time.perf_counter()

    async def fire(at: float, prompt: str) -> dict:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        return await one_request(client, args, prompt)
    results = await asyncio.gather(*(fire(at, p) for at, p in zip(times, prompts)))
    duration = time.perf_counter() - start
    relative_to(results, start)
    return results, duration, times[-1]


def rate_summary(rate: float, results: list[dict], duration: float, args, arrival_window: float = 0.0) -> dict:
    s = report.summarize(results, duration, args)
    good = sum(report.is_good(r, args.slo_ttft, args.slo_tpot) for r in results)
    keep = ("completed", "failed", "duration", "request_throughput", "output_throughput",
            "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_itl_ms", "p99_itl_ms")
    per_request = [None if "error" in r else [round(r["ttft"], 5), _rounded(report.tpot(r))] for r in results]
    return {"rate": rate, "num_requests": len(results), "arrival_window_s": round(arrival_window, 3),
            "slo_attainment": round(good / max(1, len(results)), 4),
            **{k: s[k] for k in keep}, "ttft_tpot_s": per_request,
            "request_ids": [r.get("request_id") for r in results]}


def _rounded(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 6)


def attainment_at(row: dict, slo_ttft: Optional[float], slo_tpot: Optional[float]) -> float:
    """A stored rate's attainment under another SLO, from its requests' (TTFT, TPOT) pairs
    (a failed request, None, never meets it; a one-token answer has no TPOT to miss)."""
    pairs = row["ttft_tpot_s"]
    good = sum(p is not None and report.meets_slo(p[0], p[1], slo_ttft, slo_tpot) for p in pairs)
    return round(good / max(1, len(pairs)), 4)


def goodput(rows: list[dict], attainment: float) -> Optional[float]:
    ok = [r["rate"] for r in rows if r["slo_attainment"] >= attainment]
    return max(ok) if ok else None


def plot_attainment(series: dict[str, list[dict]], out_dir: str, title: str, attainment: float) -> str:
    """slo_attainment.png: one line per series name (e.g. per cluster layout)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, rows in series.items():
        ax.plot([r["rate"] for r in rows], [100 * r["slo_attainment"] for r in rows], marker="o", label=name)
    ax.axhline(100 * attainment, color="grey", linestyle="--", linewidth=0.8, label=f"{attainment:.0%}")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("requests meeting the SLO (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return report.save_png(fig, out_dir, "slo_attainment.png")


async def sweep(args) -> dict:
    rows = []
    async with api_client(args, max_connections=None, max_keepalive_connections=64) as client:
        await resolve_model(client, args)
        for rate in parse_rates(args.request_rate):
            # NOTE: a distinct leading tag per request and rate, so a prefix cache cannot turn
            # the cycled words into hits and the load is the uncached one the SLO study means
            prompts = [f"request {rate:g}-{i}: " + cycled_prompt(i, args.prompt_len)
                       for i in range(requests_at(rate, args))]
            results, duration, window = await run_rate(client, args, rate, prompts)
            rows.append(rate_summary(rate, results, duration, args, window))
            print(f"rate {rate:g} req/s over {rows[-1]['num_requests']} requests, "
                  f"{rows[-1]['arrival_window_s']:g} s of arrivals: {rows[-1]['slo_attainment']:.0%} meet the SLO, TTFT p50 "
                  f"{rows[-1]['median_ttft_ms']} ms, ITL p99 {rows[-1]['p99_itl_ms']} ms", file=sys.stderr)
    return {"model": args.model, "slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "attainment": args.attainment,
            "requests_per_rate": args.num_requests or f"{getattr(args, 'rate_seconds', STEADY_SECONDS):g} s of arrivals",
            "goodput_rps": goodput(rows, args.attainment), "rates": rows}


def cmd_sweep(args) -> int:
    try:
        parse_rates(args.request_rate)
    except ValueError as e:
        print(f"pdcluster bench: {e}", file=sys.stderr)
        return 2
    swept = asyncio.run(sweep(args))
    if args.json:
        report.write_json(swept, args.json)
    if args.json != "-":
        print(f"{'rate':>6} {'requests':>8} {'window s':>8} {'SLO met':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'TPOT mean':>9} {'ITL p99':>8}")
        for r in swept["rates"]:
            print(f"{r['rate']:>6g} {r['num_requests']:>8} {r['arrival_window_s']:>8g} {r['slo_attainment']:>8.0%} "
                  f"{r['median_ttft_ms']!s:>9} {r['p99_ttft_ms']!s:>9} {r['mean_tpot_ms']!s:>9} {r['p99_itl_ms']!s:>8}")
        print(f"goodput (highest rate with >= {args.attainment:.0%} meeting the SLO): {swept['goodput_rps']} req/s")
    if args.plot:
        print(f"plot: {plot_attainment({args.model: swept['rates']}, args.plot, args.model, args.attainment)}",
              file=sys.stderr)
    return 0
