"""`pdcluster bench`'s streaming client spread over several processes, and its own CPU.

One Python process running httpx cannot read hundreds of fast streams: on the 2-core VM a
256-stream burst of 16 tokens cost the one client process 1.6-2.6 s of CPU and its TTFT p50
was ~1 s where a raw-socket client saw ~0.4 s of the same cluster; at 1B on an H100 (~70k
tokens/s, one event per token) it is a whole core. Then the figures are the client's, not the
cluster's. `closed_loop(args, procs)` runs the same requests (`cycled_prompt(i)`,
`one_request`) split over `procs` processes that start together (each opens its client and
resolves the model, then all are released at once) and merges their results as
`run_closed_loop` returns them, plus the clients' CPU seconds over the run: a client near
100 % of a core per process is the bottleneck. `procs = 1` runs in this process, as before.
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST_KEYS = ("url", "model", "prompt_len", "api_key", "max_tokens")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def closed_loop(args, procs: int, at_start=lambda: None) -> tuple[list[dict], float, float]:
    """(results relative to the run's start, duration, client CPU seconds) of
    `args.num_requests` streams at once (concurrency = num_requests) over `procs` processes;
    `at_start()` is called just before the requests leave (the clients started and ready)."""
    from cluster.bench import cli as bench
    if procs <= 1:
        at_start()
        cpu0 = cpu_s()
        results, duration = asyncio.run(bench.run_closed_loop(args))
        return results, duration, cpu_s() - cpu0
    from cluster.bench.client import relative_to
    shares = [args.num_requests // procs + (i < args.num_requests % procs) for i in range(procs)]
    spec = {k: getattr(args, k) for k in REQUEST_KEYS}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    children, first = [], 0
    for n in shares:
        job = json.dumps({**spec, "first": first, "n": n})
        children.append(subprocess.Popen([sys.executable, __file__, job], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, env=env))
        first += n
    try:
        for c in children:
            line = c.stdout.readline().strip()
            if line != "READY":
                raise RuntimeError(f"client process did not start: {line!r}")
        at_start()
        for c in children:                             # released together
            c.stdin.write("GO\n")
            c.stdin.flush()
        outs = [json.loads(c.stdout.readline()) for c in children]
    finally:
        for c in children:
            try:
                c.wait(timeout=30)
            except subprocess.TimeoutExpired:
                c.kill()
    start, end = min(o["start"] for o in outs), max(o["end"] for o in outs)
    results = [r for o in outs for r in o["results"]]
    relative_to(results, start)                        # perf_counter is CLOCK_MONOTONIC: one clock for all
    return results, end - start, sum(o["cpu_s"] for o in outs)


async def _child(job: dict) -> None:
    import argparse
    from cluster.bench.client import api_client, cycled_prompt, one_request, resolve_model
    args = argparse.Namespace(**{k: job[k] for k in REQUEST_KEYS})
    async with api_client(args, max_connections=job["n"]) as client:
        await resolve_model(client, args)
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu0, start = cpu_s(), time.perf_counter()
        results = await asyncio.gather(*(one_request(client, args, cycled_prompt(job["first"] + i, args.prompt_len))
                                         for i in range(job["n"])))
        end, cpu = time.perf_counter(), cpu_s() - cpu0
    print(json.dumps({"start": start, "end": end, "cpu_s": cpu, "results": results}), flush=True)


if __name__ == "__main__":
    asyncio.run(_child(json.loads(sys.argv[1])))
