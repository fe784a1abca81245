"""Host tier of the prefix cache on one GPU: does a second tier in host memory pay where reuse
exists, and cost nothing where it does not?

A unified scheduler in this process (the real runtime over the real engine, dummy weights of
`--preset`; no HTTP, so the figures are the worker's) serves two workloads, tier off and on:
1. multi-turn: `--conversations` conversations of `--turns` turns (each turn the previous
   prompt + its answer + `--turn-tokens` new tokens), turns served round-robin at concurrency
   `--concurrency`, with a device pool of `--num-pages` pages sized so the working set is
   about `--working-set` times the pool: turn >= 2 TTFT p50, tier on / off (`ttft_ratio`: long
   loads layer by layer, overlapped with the forward; `ttft_ratio_whole_loads`: each load whole
   before its forward);
2. no reuse: `--unique` distinct prompts at the same concurrency: generated tok/s, on / off, the
   median of `--repeats` runs of each, off and on alternated.
Writes host_tier_gpu.json and host_tier_gpu.md into OUT.

    python benchmarks/host_tier_gpu.py OUT                       # one H100: dummy 8B, bf16
    python benchmarks/host_tier_gpu.py OUT --preset tiny-llama --device cpu --dtype float32 \\
        --conversations 6 --turns 3 --prompt-tokens 48 --turn-tokens 16 --max-tokens 4 --unique 8
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.dummy_model import write_model_dir  # noqa: E402

PAGE_SIZE = 16


def scheduler(loaded, args, host_tier_gb: float):
    from cluster.config import SchedulerConfig
    from cluster.engine.model_runner import ModelRunner
    from cluster.unified import UnifiedScheduler
    from tests.queue_control import QueueControl
    runner = ModelRunner(loaded, args.num_pages, PAGE_SIZE, args.device, args.dtype)
    s = UnifiedScheduler(SchedulerConfig(overlap=True, num_pages=args.num_pages, page_size=PAGE_SIZE),
                         "unified-0", runner, QueueControl())
    s.enable_prefix_cache(host_tier_gb)
    timed_evictions(s.cache.tree)
    return s


def timed_evictions(tree) -> None:
    """`tree.evict_s`: the scheduler thread's CPU time in evictions (with their write-backs), which
    other load on the machine does not inflate."""
    evict, tree.evict_s = tree.evict, 0.0

    def timed(num_pages: int) -> int:
        t0 = time.thread_time()
        try:
            return evict(num_pages)
        finally:
            tree.evict_s += time.thread_time() - t0
    tree.evict = timed


def release(s) -> None:
    """Free a finished run's pools now: each tier-on run pins `--host-gb` of host memory."""
    import gc
    import torch
    s.executor.shutdown()      # its forward thread holds the tier's wrapper
    s.close()
    # the runs share one model: a finished run's tier must not gate the next run's layers
    s.runner.model._layer_gates.clear()
    s.runner = s.cache = s.executor = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def phases(s, sent_at: dict[str, float]) -> dict:
    """Where turn >= 2 TTFT goes, from the worker's request marks (wall clock, as `sent_at`):
    queued = sent -> its prefill launched, prefill = launched -> its first token; medians in s."""
    from cluster.wire import protocol as P
    marks: dict[str, dict[str, float]] = {}
    for msg in s.control.sent:
        if isinstance(msg, P.RequestMarks):
            for item in msg.items:
                for m in item.marks:
                    marks.setdefault(item.rid, {}).setdefault(m.name, m.t)
    queued = [m["prefill_launched"] - sent_at[r] for r, m in marks.items() if r in sent_at and "prefill_launched" in m]
    prefill = [m["prefill_done"] - m["prefill_launched"] for r, m in marks.items()
               if r in sent_at and {"prefill_launched", "prefill_done"} <= m.keys()]
    med = (lambda xs: round(statistics.median(xs), 4) if xs else None)
    return {"queued_p50_s": med(queued), "prefill_p50_s": med(prefill)}


def serve(s, prompts: dict[str, list[int]], args, sent_at: Optional[dict] = None
          ) -> tuple[dict[str, float], float, int]:
    """Serve `prompts` at `--concurrency`; -> (TTFT by rid, seconds, tokens generated).
    `sent_at` gets each request's wall-clock send time. The worker's messages are read once each,
    as they come (rescanning all of them every step made this loop, not the worker, the bottleneck)."""
    from cluster.wire import protocol as P
    ctl, pending, ttft, started = s.control, list(prompts.items()), {}, {}
    done, tokens, seen = set(), 0, len(ctl.sent)
    t0, last = time.perf_counter(), None
    while pending or len(done) < len(started):
        while pending and len(started) - len(done) < args.concurrency:
            rid, ids = pending.pop(0)
            started[rid] = time.perf_counter()
            if sent_at is not None:
                sent_at[rid] = time.time()
            ctl.generate(rid, ids, max_tokens=args.max_tokens, ignore_eos=True)
        last = s.overlap_step(last)
        now, new, seen = time.perf_counter(), ctl.sent[seen:], len(ctl.sent)
        for msg in new:
            if not isinstance(msg, P.Tokens):
                continue
            for item in msg.all_items():
                if item.rid not in started:
                    continue
                tokens += len(item.token_ids)
                if item.rid not in ttft and len(item.token_ids):
                    ttft[item.rid] = now - started[item.rid]
                if item.finish_reason:
                    done.add(item.rid)
        if ctl.num_errors:
            raise RuntimeError(f"worker errors: {ctl.errors()[:3]}")
        if now - t0 > args.timeout:
            raise TimeoutError("workload did not finish")
    if last is not None:
        s._process(*last)
    return ttft, time.perf_counter() - t0, tokens


def multi_turn(loaded, args, host_tier_gb: float, layerwise: bool = True) -> dict:
    rng = random.Random(0)
    vocab = loaded.config.vocab_size
    convs = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.conversations)]
    s = scheduler(loaded, args, host_tier_gb)
    if host_tier_gb and not layerwise:
        s.cache.host_tier.layerwise_min_bytes = float("inf")   # every load whole, before its forward
    later, sent_at = [], {}
    for turn in range(args.turns):
        prompts = {f"c{i}t{turn}": ids for i, ids in enumerate(convs)}
        ttft, _, _ = serve(s, prompts, args, sent_at if turn else None)
        if turn:
            later += list(ttft.values())
        out = s.control.outputs()
        convs = [ids + out[f"c{i}t{turn}"] + [rng.randrange(3, vocab) for _ in range(args.turn_tokens)]
                 for i, ids in enumerate(convs)]
    cache, where = s.cache, phases(s, sent_at)
    written = writes(cache.host_tier)
    release(s)
    layered = cache.host_tier.num_layerwise_loads if cache.host_tier is not None else 0
    return {"ttft_p50_turn2plus_s": round(statistics.median(later), 4), "turn2plus": where,
            "layerwise_loads": layered,
            "hit_tokens": cache.tier_gauges()["prefix_cache_hit_tokens_total"],
            "query_tokens": cache.num_query_tokens, **written, **{k: v for k, v in cache.tier_gauges().items()
                                                       if k != "prefix_cache_hit_tokens_total"}}


def no_reuse(loaded, args, host_tier_gb: float) -> dict:
    rng = random.Random(1)
    vocab = loaded.config.vocab_size
    s = scheduler(loaded, args, host_tier_gb)
    prompts = {f"u{i}": [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for i in range(args.unique)}
    _, seconds, tokens = serve(s, prompts, args)
    tier, evict_s = s.cache.host_tier, s.cache.tree.evict_s
    release(s)
    return {"tok_s": round(tokens / seconds, 1), "seconds": round(seconds, 2),
            "evict_ms_per_request": round(evict_s / len(prompts) * 1e3, 3), **writes(tier)}


def writes(tier) -> dict:
    """What the tier's write-backs did: pages written and skipped (its write policy), copies issued."""
    if tier is None:
        return {}
    return {"pages_written": tier.bytes_to_host // tier.page_bytes, "pages_skipped": tier.policy.num_skipped,
            "write_copies": tier.num_write_copies, "selective_at_end": tier.policy.selective}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--model-dir", help="a model dir written by benchmarks/dummy_model.py (a GPU machine has "
                    "no default GGUF to take the tokenizer from)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--turn-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--working-set", type=float, default=4.0, help="working set / device pool")
    ap.add_argument("--host-gb", type=float, default=8.0)
    ap.add_argument("--unique", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="no-reuse runs of each, alternated (median)")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    import torch
    from cluster.engine.loader import load_model
    if args.device == "cpu":
        torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    model_dir = args.model_dir or write_model_dir(os.path.join(args.out, "model"), args.preset)
    loaded = load_model("dummy", path=model_dir, load_format="dummy", dtype=args.dtype, device=args.device)
    final = args.prompt_tokens + (args.turns - 1) * (args.max_tokens + args.turn_tokens) + args.max_tokens
    working_set = args.conversations * -(-final // PAGE_SIZE)
    per_request = -(-final // PAGE_SIZE) + 1
    args.num_pages = max(int(working_set / args.working_set), per_request * args.concurrency)
    report = {"args": vars(args), "working_set_pages": working_set}
    for name, gb in (("off", 0.0), ("on", args.host_gb)):
        t0 = time.perf_counter()
        report[name] = {"multi_turn": multi_turn(loaded, args, gb), "no_reuse": {"runs_tok_s": []}}
        print(name, json.dumps(report[name]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    # no reuse: off and on alternated, so a drift of the machine falls on both; the median of each
    for _ in range(args.repeats):
        for name, gb in (("off", 0.0), ("on", args.host_gb)):
            run = no_reuse(loaded, args, gb)
            report[name]["no_reuse"]["runs_tok_s"].append(run["tok_s"])
            report[name]["no_reuse"]["evict_ms_per_request"] = run["evict_ms_per_request"]
            print(name, "no reuse", json.dumps(run), flush=True)
    for name in ("off", "on"):
        report[name]["no_reuse"]["tok_s"] = statistics.median(report[name]["no_reuse"]["runs_tok_s"])
    t0 = time.perf_counter()
    report["on_whole_loads"] = {"multi_turn": multi_turn(loaded, args, args.host_gb, layerwise=False)}
    print("on_whole_loads", json.dumps(report["on_whole_loads"]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    off, on, whole = report["off"], report["on"], report["on_whole_loads"]
    report["ttft_ratio"] = round(on["multi_turn"]["ttft_p50_turn2plus_s"] / off["multi_turn"]["ttft_p50_turn2plus_s"], 3)
    report["ttft_ratio_whole_loads"] = round(
        whole["multi_turn"]["ttft_p50_turn2plus_s"] / off["multi_turn"]["ttft_p50_turn2plus_s"], 3)
    report["no_reuse_throughput_ratio"] = round(on["no_reuse"]["tok_s"] / off["no_reuse"]["tok_s"], 3)
    with open(os.path.join(args.out, "host_tier_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = ["| workload | tier off | tier on | on / off |", "|---|---|---|---|",
          f"| multi-turn TTFT p50, turn >= 2 (s) | {off['multi_turn']['ttft_p50_turn2plus_s']} | "
          f"{on['multi_turn']['ttft_p50_turn2plus_s']} | {report['ttft_ratio']} |",
          f"| the same, every load whole before its forward (s) | | "
          f"{whole['multi_turn']['ttft_p50_turn2plus_s']} | {report['ttft_ratio_whole_loads']} |",
          f"| no reuse, generated tok/s | {off['no_reuse']['tok_s']} | {on['no_reuse']['tok_s']} | "
          f"{report['no_reuse_throughput_ratio']} |",
          f"| no reuse, each run (tok/s) | {off['no_reuse']['runs_tok_s']} | {on['no_reuse']['runs_tok_s']} | |",
          f"| no reuse, scheduler CPU in evictions, ms a request (last run) | "
          f"{off['no_reuse']['evict_ms_per_request']} | {on['no_reuse']['evict_ms_per_request']} | |",
          "", f"device pool {args.num_pages} pages, working set {working_set} pages; "
          f"hit tokens by tier (on): {on['multi_turn']['hit_tokens']}"]
    with open(os.path.join(args.out, "host_tier_gpu.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
