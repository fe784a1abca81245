"""`pdcluster bench`: an OpenAI-API load generator (TTFT, ITL, E2E latency, output tok/s).

Closed loop: `--concurrency` requests in flight, each streamed so every token's arrival is
timed. Benchmarks under `benchmarks/` reuse `one_request` so their figures are measured the
same way as the CLI's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length in words")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    p.add_argument("--json", action="store_true", help="print the report as JSON")


async def one_request(client, args, prompt: str) -> dict:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, num_tokens, error = [], 0, None
    try:
        async with client.stream("POST", "/completions", json=body) as resp:
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
                elif event["choices"] and event["choices"][0]["text"]:
                    arrivals.append(time.perf_counter())
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error or not arrivals:
        return {"error": error or "no tokens"}
    itl = [(b - a) for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": arrivals[0] - start, "itl": itl, "e2e": end - start,
            "num_tokens": num_tokens or len(arrivals)}


async def _bench(args) -> dict:
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

        async def run(i: int):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(args.prompt_len))
            async with gate:
                return await one_request(client, args, prompt)
        start = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(args.num_requests)))
        duration = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ms = lambda xs, q: round(1000 * _quantile(xs, q), 2) if xs else None  # noqa: E731
    ttft, itl = [r["ttft"] for r in ok], [x for r in ok for x in r["itl"]]
    e2e = [r["e2e"] for r in ok]
    num_tokens = sum(r["num_tokens"] for r in ok)
    return {"model": args.model, "num_requests": args.num_requests, "num_ok": len(ok),
            "num_failed": len(results) - len(ok), "concurrency": args.concurrency,
            "duration_s": round(duration, 3), "output_tokens": num_tokens,
            "output_tok_per_s": round(num_tokens / duration, 2) if duration else 0.0,
            "requests_per_s": round(len(ok) / duration, 3) if duration else 0.0,
            "ttft_ms_mean": round(1000 * statistics.fmean(ttft), 2) if ttft else None,
            "ttft_ms_p50": ms(ttft, 0.5), "ttft_ms_p99": ms(ttft, 0.99),
            "itl_ms_mean": round(1000 * statistics.fmean(itl), 2) if itl else None,
            "itl_ms_p50": ms(itl, 0.5), "itl_ms_p99": ms(itl, 0.99),
            "e2e_ms_p50": ms(e2e, 0.5), "e2e_ms_p99": ms(e2e, 0.99),
            "errors": sorted({r["error"] for r in results if "error" in r})[:5]}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def cmd_bench(args) -> int:
    report = asyncio.run(_bench(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for k, v in report.items():
            print(f"{k:<{width}}  {v}")
    return 0 if report["num_ok"] == report["num_requests"] else 1
