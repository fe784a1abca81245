"""Prefix caching on a multi-turn chat workload (`pdcluster bench --multi-turn`), side by side.

    python benchmarks/prefix_cache.py [--conversations 8] [--turns 4] [--system-prompt-len 200]
        [--user-len 20] [--max-tokens 16] [--only off,on,rr2,ca2,local] [--json FILE]
        [--model-path DIR --device cuda --dtype bfloat16]     # dummy weights of DIR/config.json on a GPU

Scenarios, each its own cluster launched with `pdcluster launch` (free port, temp logs):
- off:   1 prefill + 1 decode, `[cache] prefix_cache = false`  (every turn prefilled from scratch)
- on:    1 prefill + 1 decode, prefix cache on (the default)
- rr2:   2 prefill + 1 decode, cache on, `router.policy = "round_robin"`
- ca2:   2 prefill + 1 decode, cache on, `router.policy = "cache_aware"`
- local: 1 prefill + 1 decode, cache on, cache_aware, `router.local_prefill_max_tokens = 64`:
         a turn whose uncached part is short is prefilled by decode itself (no KV transfer)

The workload is the same for all: `--conversations` chats with one shared system prompt;
every turn re-sends the whole history plus a new user message, greedy, `ignore_eos`,
exactly `--max-tokens` answer tokens. After each turn the router's /metrics are read:
prefill workers' `prefix_cache_hit_tokens_total` / `prefix_cache_query_tokens_total`
(the hit rate) and `kv_transfer_bytes_total` (KV bytes that turn).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.common import Cluster, machine, metric_values, now_utc  # noqa: E402
from cluster.bench import report as bench_report  # noqa: E402
from cluster.bench.multiturn import per_turn, run_conversations  # noqa: E402

SCENARIOS = {   # name -> (prefill workers, prefix cache, policy, local_prefill_max_tokens)
    "off": (1, False, "round_robin", 0),
    "on": (1, True, "round_robin", 0),
    "rr2": (2, True, "round_robin", 0),
    "ca2": (2, True, "cache_aware", 0),
    "local": (1, True, "cache_aware", 64),
}


NUM_PAGES = 1024


def model_section(args) -> str:
    """The [model] table: the embedded default, or (GPU runs) a dummy-weight model directory."""
    if not args.model_path:
        return ""
    return "\n".join([f'name = "{args.model_name}"', f'path = "{args.model_path}"', 'load_format = "dummy"',
                      f'device = "{args.device}"', f'dtype = "{args.dtype}"'])


def config(num_prefill: int, prefix_cache: bool, policy: str, local_max: int, model: str = "") -> str:
    return f"""
[model]
{model or 'name = "smollm2-135m-instruct"'}

[router]
policy = "{policy}"
local_prefill_max_tokens = {local_max}

[scheduler]
num_pages = {NUM_PAGES}

[cache]
prefix_cache = {str(prefix_cache).lower()}

[[prefill]]
count = {num_prefill}

[[decode]]
count = 1
"""


def prefill_counters(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    total = lambda name: sum(v for k, v in metric_values(text, "pdcluster:" + name).items()  # noqa: E731
                             if 'role="prefill"' in k)
    return {"hit": total("prefix_cache_hit_tokens_total"), "query": total("prefix_cache_query_tokens_total"),
            "kv_bytes": total("kv_transfer_bytes_total")}


def run_scenario(name: str, args) -> dict:
    num_prefill, prefix_cache, policy, local_max = SCENARIOS[name]
    print(f"[{name}] {num_prefill} prefill + 1 decode, prefix_cache={prefix_cache}, policy={policy}, "
          f"local_prefill_max_tokens={local_max}", flush=True)
    with Cluster(config(num_prefill, prefix_cache, policy, local_max, model_section(args)),
                 f"prefix-{name}") as c:
        bargs = SimpleNamespace(url=c.base_url + "/v1", model=None, api_key="", concurrency=args.conversations,
                                max_tokens=args.max_tokens, conversations=args.conversations, turns=args.turns,
                                system_prompt_len=args.system_prompt_len, user_len=args.user_len, seed=args.seed)
        time.sleep(1.5)                          # one heartbeat: counters start from the idle cluster
        snapshots = [prefill_counters(c.base_url)]

        def on_turn_end(turn: int) -> None:
            time.sleep(1.5)                      # the workers' counters arrive with their heartbeat
            snapshots.append(prefill_counters(c.base_url))

        results, duration = asyncio.run(run_conversations(bargs, on_turn_end))
        local_lines = c.log("router").count("local prefill:")
    summary = bench_report.summarize(results, duration, bargs)
    turns = per_turn(results)
    for t in turns:
        a, b = snapshots[t - 1], snapshots[t]
        q = b["query"] - a["query"]
        turns[t]["prefill_hit_rate"] = round((b["hit"] - a["hit"]) / q, 3) if q else None
        turns[t]["kv_bytes"] = int(b["kv_bytes"] - a["kv_bytes"])
    first, last = snapshots[0], snapshots[-1]
    q = last["query"] - first["query"]
    later = [r for r in results if r["turn"] >= 2 and "error" not in r]
    out = {"scenario": name, "failed": summary["failed"], "duration_s": summary["duration"],
           "output_tok_s": summary["output_throughput"],
           "ttft_p50_ms": summary["median_ttft_ms"], "ttft_p99_ms": summary["p99_ttft_ms"],
           "turn2plus_ttft_p50_ms": round(bench_report.percentile([1000 * r["ttft"] for r in later], 50), 1),
           "turn2plus_ttft_p99_ms": round(bench_report.percentile([1000 * r["ttft"] for r in later], 99), 1),
           "prefill_hit_rate": round((last["hit"] - first["hit"]) / q, 3) if q else 0.0,
           "kv_bytes_total": int(last["kv_bytes"] - first["kv_bytes"]), "local_prefills": local_lines,
           "turns": turns}
    print(json.dumps({k: v for k, v in out.items() if k != "turns"}), flush=True)
    for t, s in turns.items():
        print(f"  turn {t}: {s}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-prompt-len", type=int, default=200)
    ap.add_argument("--user-len", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(SCENARIOS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--model-path", default="", help="GPU runs: a model directory served with dummy weights")
    ap.add_argument("--model-name", default="dummy")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-pages", type=int, default=1024)
    args = ap.parse_args(argv)
    global NUM_PAGES
    NUM_PAGES = args.num_pages
    print(f"machine: {machine()}; {now_utc()}", flush=True)
    results = [run_scenario(name, args) for name in args.only.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "date": now_utc(), "args": vars(args),
                                               "results": results}, indent=2) + "\n")
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
