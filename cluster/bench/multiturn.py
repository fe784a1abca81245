"""`pdcluster bench --multi-turn`: conversations that re-send their history every turn.

Each conversation starts from one shared system prompt and a user message; every turn
appends the previous answer and a new user message and goes out as a streamed
`/chat/completions` request, so turn t's prompt holds turn t-1's whole prompt and answer:
the workload prefix caching, cache-aware routing and decode-side reuse are for.
`--concurrency` conversations run at once; within one, turns are sequential. The order
in which conversations start a turn is shuffled (seeded), as users reply at different
times. Reported: the usual summary over all requests, and TTFT p50/p99 per turn.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time

from cluster.bench import report
from cluster.bench.client import api_client, relative_to, resolve_model, stream_timed
from cluster.progress import ProgressBar

WORDS = ("bread", "flour", "oven", "crust", "yeast", "butter", "sugar", "salt", "rye", "wheat",
         "dough", "knead", "proof", "bake", "slice", "toast", "honey", "seed", "grain", "loaf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--multi-turn", action="store_true",
                   help="multi-turn chat: --conversations x --turns requests with a shared system prompt")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-prompt-len", type=int, default=200, help="shared system prompt, in words")
    p.add_argument("--user-len", type=int, default=20, help="each user message, in words")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def one_turn(client, args, messages: list[dict]) -> dict:
    body = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    return await stream_timed(client, "/chat/completions", body, lambda choice: choice["delta"].get("content"))


async def run_conversations(args, on_turn_end=None) -> tuple[list[dict], float]:
    """Every turn's result (with `conversation` and `turn`), and the run's duration;
    `on_turn_end(turn)` runs after every conversation finished that turn (benchmarks
    read the cluster's counters there)."""
    rng = random.Random(getattr(args, "seed", 0) or 0)
    system = "You are a baker's assistant. Notes: " + _text(rng, args.system_prompt_len)
    users = [[_text(rng, args.user_len) for _ in range(args.turns)] for _ in range(args.conversations)]
    async with api_client(args, max_connections=args.concurrency) as client:
        await resolve_model(client, args)
        history = [[{"role": "system", "content": system}] for _ in range(args.conversations)]
        gate = asyncio.Semaphore(args.concurrency)
        progress = ProgressBar(args.conversations * args.turns, desc="turns", unit="turn")
        results: list[dict] = []

        async def turn(c: int, t: int) -> None:
            history[c].append({"role": "user", "content": users[c][t]})
            async with gate:
                r = await one_turn(client, args, list(history[c]))
            history[c].append({"role": "assistant", "content": r.get("text", "")})
            results.append({**r, "conversation": c, "turn": t + 1})
            progress.update()

        start = time.perf_counter()
        try:
            for t in range(args.turns):            # every conversation's turn t, in shuffled order
                order = list(range(args.conversations))
                rng.shuffle(order)
                await asyncio.gather(*(turn(c, t) for c in order))
                if on_turn_end is not None:
                    await asyncio.to_thread(on_turn_end, t + 1)
        finally:
            progress.close()
        duration = time.perf_counter() - start
    relative_to(results, start)
    return results, duration


def per_turn(results: list[dict]) -> dict[int, dict]:
    out = {}
    for t in sorted({r["turn"] for r in results}):
        ttfts = [1000 * r["ttft"] for r in results if r["turn"] == t and "error" not in r]
        prompt = [r["prompt_tokens"] for r in results if r["turn"] == t and "error" not in r]
        out[t] = {"median_ttft_ms": round(report.percentile(ttfts, 50), 3) if ttfts else None,
                  "p99_ttft_ms": round(report.percentile(ttfts, 99), 3) if ttfts else None,
                  "mean_prompt_tokens": round(sum(prompt) / len(prompt), 1) if prompt else None}
    return out


def cmd_bench_multiturn(args) -> int:
    results, duration = asyncio.run(run_conversations(args))
    summary = report.summarize(results, duration, args)
    summary["turns"] = per_turn(results)
    if args.json:
        report.write_json(summary, args.json)
    if args.json != "-":
        report.print_summary(summary)
        print(f"{'turn':>4} {'prompt tok':>10} {'TTFT p50 (ms)':>14} {'TTFT p99 (ms)':>14}")
        for t, s in summary["turns"].items():
            print(f"{t:>4} {s['mean_prompt_tokens'] or 0:>10} {s['median_ttft_ms'] or 0:>14.1f} "
                  f"{s['p99_ttft_ms'] or 0:>14.1f}")
    return 0 if summary["completed"] == summary["num_prompts"] else 1
