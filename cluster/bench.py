"""`pdcluster bench`: an OpenAI-API load generator (TTFT, ITL, E2E latency, output tok/s).

Closed loop: `--concurrency` requests in flight, each streamed so every token's arrival is
timed. Benchmarks under `benchmarks/` reuse `one_request` so their figures are measured the
same way as the CLI's. The summary, `--json`, `--plot` and the progress bar are
`cluster/bench_report.py`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from cluster import bench_goodput, bench_multiturn, bench_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length in words")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    bench_report.add_arguments(p)
    bench_goodput.add_arguments(p)
    bench_multiturn.add_arguments(p)


async def one_request(client, args, prompt: str) -> dict:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    return await stream_timed(client, "/completions", body, lambda choice: choice["text"])


async def stream_timed(client, path: str, body: dict, text_of) -> dict:
    """Stream one request, timing every chunk that carries text (`text_of(choice)`)."""
    start = time.perf_counter()
    arrivals, text, num_tokens, num_prompt, error, rid = [], [], 0, 0, None, None
    try:
        async with client.stream("POST", path, json=body) as resp:
            rid = resp.headers.get("x-request-id")     # the router's id: GET /debug/requests/{rid}
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"].get("message")
                elif event.get("usage"):
                    num_tokens = event["usage"]["completion_tokens"]
                    num_prompt = event["usage"]["prompt_tokens"]
                elif event["choices"] and (piece := text_of(event["choices"][0])):
                    arrivals.append(time.perf_counter())
                    text.append(piece)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error or not arrivals:
        return {"error": error or "no tokens"}
    itl = [(b - a) for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": arrivals[0] - start, "itl": itl, "e2e": end - start,
            "num_tokens": num_tokens or len(arrivals), "prompt_tokens": num_prompt,
            "start": start, "arrivals": arrivals, "text": "".join(text), "request_id": rid}


def relative_to(results: list[dict], start: float) -> None:
    """Times of successful results become seconds since the run's `start`."""
    for r in results:
        if "error" not in r:
            r["arrivals"] = [t - start for t in r["arrivals"]]
            r["start"] -= start


async def _bench(args) -> tuple[list[dict], float]:
    """Every request's result (times relative to the run's start) and the run's duration."""
    import httpx
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600.0)) as client:
        if args.model is None:
            args.model = (await client.get("/models")).json()["data"][0]["id"]
        words = ("alpha", "beta", "gamma", "delta", "omega")
        gate = asyncio.Semaphore(args.concurrency)
        progress = bench_report.Progress(args.num_requests)

        async def run(i: int):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(args.prompt_len))
            async with gate:
                r = await one_request(client, args, prompt)
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
    problem = bench_report.check_arguments(args)
    if problem:
        print(f"pdcluster bench: {problem}", file=sys.stderr)
        return 2
    if args.multi_turn:
        return bench_multiturn.cmd_bench_multiturn(args)
    if args.request_rate:
        return bench_goodput.cmd_sweep(args)
    results, duration = asyncio.run(_bench(args))
    summary = bench_report.report(results, duration, args)
    return 0 if summary["completed"] == summary["num_prompts"] else 1
