"""The same requests through a disaggregated cluster and a unified worker, side by side.

    python benchmarks/cluster_compare.py [--num-requests 64] [--concurrency 16]
        [--prompt-len 128] [--max-tokens 32] [--request-rate 0] [--rounds 1] [--json FILE]

Clusters, launched one after the other with `pdcluster launch` (free port, temp logs):
- disagg:  configs/local.toml without its [[dllm]] group (1 prefill + 1 decode + router)
- unified: configs/unified.toml (1 unified worker + router)

Each gets a warm-up burst (one request per concurrency slot), then `--num-requests`
streamed greedy completions (`ignore_eos`, exactly `--max-tokens` tokens), `--concurrency`
in flight (closed loop; `--request-rate R` sends them open loop instead, Poisson
arrivals at R/s, seeded, still capped by `--concurrency`), through the HTTP API with
`pdcluster bench`'s own per-request client (`cluster.bench.client.one_request`); prompts are
`pdcluster bench`'s (`--prompt-len` words, rotated per request), identical for both. `--rounds 2` runs disagg, unified,
disagg, unified and reports the median of rounds, which evens out a machine shared with
other jobs.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.common import REPO, Cluster, disagg_config, machine, now_utc, quantile, stream_completion  # noqa: E402
from cluster.bench.client import cycled_prompt, one_request  # noqa: E402


async def run_load(base_url: str, args, num_requests: int, offset: int = 0) -> dict:
    req_args = SimpleNamespace(model=None, max_tokens=args.max_tokens)
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base_url + "/v1", limits=limits,
                                 timeout=httpx.Timeout(600.0)) as client:
        req_args.model = (await client.get("/models")).json()["data"][0]["id"]
        start = time.perf_counter()
        gate = asyncio.Semaphore(args.concurrency)
        done = 0
        rng = random.Random(0)                     # open loop: the same Poisson arrivals every run
        arrivals = list(itertools.accumulate(rng.expovariate(args.request_rate) for _ in range(num_requests))) \
            if args.request_rate > 0 else [0.0] * num_requests

        async def one(i: int) -> dict:
            nonlocal done
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            async with gate:
                r = await one_request(client, req_args, cycled_prompt(offset + i, args.prompt_len))
            done += 1
            if done % max(1, num_requests // 4) == 0:
                print(f"    {done}/{num_requests} done", flush=True)
            return r
        results = await asyncio.gather(*(one(i) for i in range(num_requests)))
        duration = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    num_tokens = sum(r["num_tokens"] for r in ok)
    return {"num_ok": len(ok), "num_failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3],
            "duration_s": duration, "output_tokens": num_tokens,
            "ttft_p50_ms": 1000 * quantile(ttft, 0.5), "ttft_p90_ms": 1000 * quantile(ttft, 0.9),
            "itl_p50_ms": 1000 * quantile(itl, 0.5), "itl_p90_ms": 1000 * quantile(itl, 0.9),
            "itl_p99_ms": 1000 * quantile(itl, 0.99), "itl_max_ms": 1000 * max(itl, default=float("nan")),
            "e2e_p50_s": quantile([r["e2e"] for r in ok], 0.5),
            "output_tok_per_s": num_tokens / duration if duration else 0.0}


async def prompt_tokens(base_url: str, prompt: str) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0)) as client:
        r = await stream_completion(client, prompt, max_tokens=1)
    return r["usage"].get("prompt_tokens", -1)


def run_cluster(name: str, toml: str, args) -> dict:
    print(f"  [{name}] launching (load average {machine().split('load average ')[1]})", flush=True)
    with Cluster(toml, name) as cluster:
        n_prompt = asyncio.run(prompt_tokens(cluster.base_url, cycled_prompt(0, args.prompt_len)))
        print(f"  [{name}] warm-up: {args.concurrency} requests ({n_prompt} prompt tokens each)", flush=True)
        asyncio.run(run_load(cluster.base_url, args, args.concurrency, offset=10_000))
        print(f"  [{name}] measuring: {args.num_requests} requests, concurrency {args.concurrency}", flush=True)
        res = asyncio.run(run_load(cluster.base_url, args, args.num_requests))
    res["prompt_tokens"] = n_prompt
    print(f"  [{name}] TTFT p50 {res['ttft_p50_ms']:.0f} ms, p90 {res['ttft_p90_ms']:.0f} ms, ITL p50 "
          f"{res['itl_p50_ms']:.1f} ms, {res['output_tok_per_s']:.1f} output tok/s, "
          f"{res['num_failed']} failed {res['errors']}", flush=True)
    return res


ROWS = (("TTFT p50 (ms)", "ttft_p50_ms", "{:.0f}"), ("TTFT p90 (ms)", "ttft_p90_ms", "{:.0f}"),
        ("ITL p50 (ms)", "itl_p50_ms", "{:.1f}"), ("ITL p90 (ms)", "itl_p90_ms", "{:.1f}"),
        ("ITL p99 (ms)", "itl_p99_ms", "{:.0f}"), ("ITL max (ms)", "itl_max_ms", "{:.0f}"),
        ("e2e p50 (s)", "e2e_p50_s", "{:.2f}"), ("output tok/s", "output_tok_per_s", "{:.1f}"),
        ("wall time (s)", "duration_s", "{:.1f}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt length in words (as pdcluster bench)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=0.0,
                    help="open loop: Poisson arrivals at this many requests/s (0 = closed loop)")
    ap.add_argument("--rounds", type=int, default=1, help="disagg+unified pairs; the median is reported")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    configs = {"disagg": disagg_config(), "unified": (REPO / "configs/unified.toml").read_text()}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for rnd in range(args.rounds):
        for name, toml in configs.items():
            print(f"[round {rnd + 1}/{args.rounds}] {name}", flush=True)
            runs[name].append(run_cluster(name, toml, args))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for name, rs in runs.items()}
    print(f"\n{machine()}; {now_utc()}")
    load = f"Poisson arrivals at {args.request_rate:g} req/s, " if args.request_rate > 0 else ""
    print(f"{args.num_requests} requests, {load}concurrency {args.concurrency}, prompt {args.prompt_len} words "
          f"({med['disagg']['prompt_tokens']:.0f} tokens), {args.max_tokens} output tokens, greedy, ignore_eos; "
          f"median of {args.rounds} round(s)\n")
    print("| metric | disagg (1P+1D) | unified | disagg / unified |")
    print("|---|---|---|---|")
    for label, key, fmt in ROWS:
        d, u = med["disagg"][key], med["unified"][key]
        print(f"| {label} | {fmt.format(d)} | {fmt.format(u)} | {d / u:.2f}x |")
    failed = {name: sum(r["num_failed"] for r in rs) for name, rs in runs.items()}
    if any(failed.values()):
        print(f"\nFAILED requests: {failed}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
