"""`pdcluster bench`: the arguments and the closed loop (TTFT, ITL, E2E latency, output tok/s).

Closed loop: `--concurrency` requests in flight, each streamed so every token's arrival is
timed (`client.one_request`). `--request-rate` switches to the open loop of `goodput`,
`--multi-turn` to the conversations of `multiturn`. The summary, `--json`, `--plot` and the
progress bar are `report`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from cluster.bench import goodput, multiturn, report
from cluster.bench.client import api_client, cycled_prompt, one_request, relative_to, resolve_model

CLOSED_LOOP_REQUESTS = 32


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--num-requests", type=int, default=None,
                   help=f"requests to send (default {CLOSED_LOOP_REQUESTS}; with --request-rate: per "
                        "rate, default --rate-seconds of arrivals)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length in words")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    report.add_arguments(p)
    goodput.add_arguments(p)
    multiturn.add_arguments(p)


async def run_closed_loop(args) -> tuple[list[dict], float]:
    """Every request's result (times relative to the run's start) and the run's duration."""
    async with api_client(args, max_connections=args.concurrency) as client:
        await resolve_model(client, args)
        gate = asyncio.Semaphore(args.concurrency)
        progress = report.Progress(args.num_requests)

        async def run(i: int):
            async with gate:
                r = await one_request(client, args, cycled_prompt(i, args.prompt_len))
            progress.update()
            return r
        start = time.perf_counter()
        try:
            results = await asyncio.gather(*(run(i) for i in range(args.num_requests)))
        finally:
            progress.close()
        duration = time.perf_counter() - start
    relative_to(results, start)
    return results, duration


def cmd_bench(args) -> int:
    problem = report.check_arguments(args)
    if problem:
        print(f"pdcluster bench: {problem}", file=sys.stderr)
        return 2
    if args.multi_turn:
        return multiturn.cmd_bench_multiturn(args)
    if args.request_rate:
        return goodput.cmd_sweep(args)
    args.num_requests = args.num_requests or CLOSED_LOOP_REQUESTS
    results, duration = asyncio.run(run_closed_loop(args))
    summary = report.report(results, duration, args)
    return 0 if summary["completed"] == summary["num_prompts"] else 1
