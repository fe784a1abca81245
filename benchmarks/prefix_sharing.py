"""Prefix sharing (runtime/prefix_sharing.py) against the behaviour before it (pages cached at finish
only, no hold), in one in-process unified worker with the default model and the prefix cache on,
alternated per round. The load is `pdcluster bench`'s: 200-word prompts cycled from 5 words (5
distinct), greedy, ignore_eos, without the router and HTTP in the way.

- first wave: 16 requests arriving together, `--wave-tokens` tokens each: seconds, prompt tokens
  computed, cache hits;
- closed loop: `--requests` requests, `--streams` at a time (a new one when one finishes),
  `--tokens` each: output tok/s, TTFT, and the process's CPU seconds (the steadier figure on a shared
  machine: wall time follows how much of the cores the others leave).

    python benchmarks/prefix_sharing.py [--rounds 3] [--streams 16 --requests 32 --tokens 64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cluster.runtime.prefix_sharing as sharing_mod  # noqa: E402
import cluster.runtime.worker_scheduler as worker_mod  # noqa: E402
from cluster.bench.client import cycled_prompt  # noqa: E402
from cluster.config import SchedulerConfig  # noqa: E402
from cluster.engine.loader import load_model  # noqa: E402
from cluster.unified import UnifiedScheduler  # noqa: E402
from cluster.wire import protocol as P  # noqa: E402
from tests.inprocess_workers import drain, runner_for  # noqa: E402
from tests.queue_control import QueueControl  # noqa: E402

SHOULD_WAIT, CACHE_PREFILLED = sharing_mod.PrefixSharing.should_wait, worker_mod.cache_prefilled


def worker(loaded, sharing: bool) -> UnifiedScheduler:
    """A unified worker with the prefix cache; without `sharing`, as before prefix sharing."""
    sharing_mod.PrefixSharing.should_wait = SHOULD_WAIT if sharing else (lambda self, *args: False)
    worker_mod.cache_prefilled = CACHE_PREFILLED if sharing else (lambda cache, batch: None)
    s = UnifiedScheduler(SchedulerConfig(overlap=True), "unified-0", runner_for(loaded, 1024), QueueControl())
    s.enable_prefix_cache()
    return s


def first_wave(loaded, prompts, sharing: bool, tokens: int) -> str:
    s = worker(loaded, sharing)
    computed = []
    forward = s.executor.forward_fn
    s.executor.forward_fn = lambda fi: (computed.append(0 if fi.is_decode else sum(fi.extend_lens)), forward(fi))[1]
    ctl = s.control
    t0 = time.perf_counter()
    for i in range(16):
        ctl.generate(f"r{i}", prompts[i % len(prompts)], max_tokens=tokens, ignore_eos=True)
    drain([s], [None], lambda: len(ctl.finished()) == 16)
    return (f"first wave {time.perf_counter() - t0:.2f} s, prompt tokens computed {sum(computed)}, "
            f"cache hits {s.cache.num_hit_tokens}")


def closed_loop(loaded, prompts, sharing: bool, args) -> str:
    s = worker(loaded, sharing)
    ctl = s.control
    sent, last, started, ttft = 0, None, {}, {}
    send = ctl.send

    def timed_send(msg) -> None:   # the first token of each request, as the router would see it
        if isinstance(msg, P.Tokens):
            for item in msg.all_items():
                ttft.setdefault(item.rid, time.perf_counter() - started[item.rid])
        send(msg)
    ctl.send = timed_send
    t0, cpu0 = time.perf_counter(), time.process_time()
    while ctl.num_finished < args.requests:
        while sent < args.requests and sent - ctl.num_finished < args.streams:
            started[f"r{sent}"] = time.perf_counter()
            ctl.generate(f"r{sent}", prompts[sent % len(prompts)], max_tokens=args.tokens, ignore_eos=True)
            sent += 1
        last = s.overlap_step(last)
    wall = time.perf_counter() - t0
    ms = sorted(1000 * t for t in ttft.values())
    return (f"closed loop {args.requests * args.tokens / wall:.1f} tok/s, {time.process_time() - cpu0:.1f} CPU s, "
            f"TTFT p50 {statistics.median(ms):.0f} ms max {ms[-1]:.0f} ms, cache hits {s.cache.num_hit_tokens}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wave-tokens", type=int, default=8)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_model()
    prompts = [loaded.tokenizer.encode(cycled_prompt(i, 200)) for i in range(5)]
    for _ in range(args.rounds):
        for sharing in (False, True):
            wave = first_wave(loaded, prompts, sharing, args.wave_tokens)
            loop = closed_loop(loaded, prompts, sharing, args)
            print(f"{'prefix sharing  ' if sharing else 'cached at finish'}: {wave}; {loop} "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
