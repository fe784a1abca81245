"""A long-prompt burst beside running DLLM requests: their block time with local vs remote prefill.

    python benchmarks/dllm_burst.py --device cuda --model-dir /tmp/m8b \\
        --prompt-tokens 8192 --running 32 --block-size 4 --max-tokens 4096 --json dllm_burst.json
    python benchmarks/dllm_burst.py --device cpu --prompt-tokens 256 --running 2 --max-tokens 16   # rehearsal

(`--model-dir`: a directory with config.json + tokenizer.json, loaded with load_format = "dummy",
e.g. `python benchmarks/dummy_model.py /tmp/m8b --preset llama-3.1-8b`; without it the default
model.) For each mode it launches a cluster from a generated config (`pdcluster launch`):

- local:  one DLLM worker that prefills its own prompts (`[[dllm]] prefill = "local"`);
- remote: the same DLLM worker plus one prefill worker (`prefill = "remote"`); on CUDA both
  share GPU 0 (`share_gpus`), so the prefill competes for the same device.

It starts `--running` DLLM requests (short prompts, `--max-tokens` each, fixed_steps with
`--steps-per-block` forwards per block, streamed: one SSE event per block), waits until every
one has streamed a block, then sends `--burst` requests of `--prompt-tokens` prompt tokens at
once. Block time = the gap between two consecutive events of one running request; the figure is
the p99 of the gaps that overlap the burst window (from sending the burst to the last burst
request's first event), and the ratio remote / local (the goal: <= 0.5).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.common import Cluster, machine, now_utc, quantile, stream_completion  # noqa: E402

MODEL = "burst-dllm"
PAGE = 16
RUNNING_PROMPT = 32             # prompt tokens of each running request


def config(args, mode: str) -> str:
    """The cluster of one mode: a DLLM worker, plus a prefill worker for `remote`."""
    on_gpu = args.device != "cpu"
    # pages a DLLM worker reserves at admission (prompt + max_tokens): the running requests, the
    # burst, and the warm-up prompt (prefill workers take the same [scheduler] and need less)
    need_tokens = (args.running * (RUNNING_PROMPT + args.max_tokens)
                   + (args.burst + 1) * (args.prompt_tokens + args.block_size))
    model = [f'name = "{args.model_name}"', f'device = "{args.device}"',
             f'dtype = "{"bfloat16" if on_gpu else "float32"}"',
             f"max_model_len = {args.prompt_tokens + args.max_tokens + 64}"]
    if args.model_dir:
        model += [f'path = "{os.path.abspath(args.model_dir)}"', 'load_format = "dummy"']
    elif not on_gpu:
        model += ['cpu_weights = "float32"']
    gpus = "gpus = [0]\nshare_gpus = true\n" if on_gpu else ""
    groups = f"""
[[dllm]]
count = 1
model = "{MODEL}"
prefill = "{mode}"
block_size = {args.block_size}
algorithm = "fixed_steps"
steps_per_block = {args.steps_per_block}
{gpus}"""
    if mode == "remote":
        groups = f"[[prefill]]\ncount = 1\n{gpus}\n" + groups
    return "\n".join(["[model]", *model, "", "[scheduler]", f"page_size = {PAGE}",
                      f"num_pages = {need_tokens // PAGE + 4 * (args.running + args.burst) + 64}",
                      f"max_running_requests = {args.running + args.burst + 4}",
                      f"max_prefill_tokens = {args.max_prefill_tokens}", "",
                      "[timeouts]", "register = 900", "request = 1800", "", groups])


def prompt_ids(i: int, n: int) -> list[int]:
    """`n` token ids, distinct per request (no prefix cache hit between them)."""
    return [100 + (i * 7919 + j * 31) % 20000 for j in range(n)]


async def one(client, ids, max_tokens: int) -> dict:
    return await stream_completion(client, ids, max_tokens=max_tokens, model=MODEL)


async def measure(base_url: str, args) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(1800.0)) as client:
        # warm-up: one burst-sized prompt and a few short ones (kernels for both shapes)
        await one(client, prompt_ids(10_000, args.prompt_tokens), args.block_size)
        await asyncio.gather(*(one(client, prompt_ids(10_001 + i, RUNNING_PROMPT), 2 * args.block_size)
                               for i in range(2)))
        running = [asyncio.create_task(one(client, prompt_ids(i, RUNNING_PROMPT), args.max_tokens))
                   for i in range(args.running)]
        await wait_all_streaming(running, args)
        t_burst = time.time()
        burst = await asyncio.gather(*(one(client, prompt_ids(1000 + i, args.prompt_tokens), args.block_size)
                                       for i in range(args.burst)))
        steady = await asyncio.gather(*running)
    window = (t_burst, max(r["arrivals"][0] if r["arrivals"] else r["t_end"] for r in burst))
    gaps, all_gaps = [], []
    for r in steady:
        for a, b in zip(r["arrivals"], r["arrivals"][1:]):
            all_gaps.append(b - a)
            if b > window[0] and a < window[1]:
                gaps.append(b - a)
    if not gaps:
        raise SystemExit(f"no running request streamed during the burst window ({window[1] - window[0]:.2f} s): "
                         "raise --max-tokens")
    return {"block_time_p99_s": quantile(gaps, 0.99), "block_time_p50_s": quantile(gaps, 0.5),
            "block_time_max_s": max(gaps), "num_gaps_in_window": len(gaps),
            "block_time_p50_s_overall": quantile(all_gaps, 0.5),
            "burst_window_s": window[1] - window[0],
            "burst_ttft_s": [round((r["arrivals"] or [r["t_end"]])[0] - r["t_send"], 4) for r in burst],
            "burst_prompt_tokens": [r["usage"].get("prompt_tokens") for r in burst]}


async def wait_all_streaming(tasks, args) -> None:
    """Until the DLLM worker runs every one of them (its gauge, a heartbeat late), plus a moment
    for their first blocks."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if any(t.done() for t in tasks):
            raise SystemExit("a running request finished before the burst: raise --max-tokens")
        if await running_count(args) >= len(tasks):
            await asyncio.sleep(1.5)
            return
    raise SystemExit("running requests did not start in time")


async def running_count(args) -> int:
    async with httpx.AsyncClient(base_url=args.base_url, timeout=10) as client:
        text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("pdcluster:num_running_reqs{") and 'role="dllm"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def wait_for_workers(base_url: str, roles: dict, timeout_s: float = 900) -> None:
    """/health turns 200 with the DLLM worker alone: wait for every worker of the mode."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = httpx.get(base_url + "/health", timeout=10).json()["workers"]
        if all(counts.get(r, 0) >= n for r, n in roles.items()):
            return
        time.sleep(1.0)
    raise SystemExit(f"workers {roles} not all registered in {timeout_s:.0f} s")


def run_mode(args, mode: str) -> dict:
    print(f"[{mode}] launching", flush=True)
    with Cluster(config(args, mode), f"dllm-burst-{mode}", timeout_s=900) as cluster:
        wait_for_workers(cluster.base_url, {"dllm": 1, **({"prefill": 1} if mode == "remote" else {})})
        args.base_url = cluster.base_url
        res = asyncio.run(measure(cluster.base_url, args))
        dllm_log = cluster.log("dllm-0")
    res["dllm_rounds_logged"] = dllm_log.count("Prefill batch [")
    print(f"[{mode}] block time p99 {1000 * res['block_time_p99_s']:.1f} ms, p50 "
          f"{1000 * res['block_time_p50_s']:.1f} ms over {res['num_gaps_in_window']} gaps in a "
          f"{res['burst_window_s']:.2f} s burst window; burst TTFT {res['burst_ttft_s']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    ap.add_argument("--model-dir", default="", help="config.json + tokenizer.json, load_format = dummy")
    ap.add_argument("--model-name", default="smollm2-135m-instruct", help="[model] name")
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--burst", type=int, default=1, help="long-prompt requests sent at once")
    ap.add_argument("--running", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--steps-per-block", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256, help="of each running request")
    ap.add_argument("--max-prefill-tokens", type=int, default=4096, help="[scheduler] max_prefill_tokens")
    ap.add_argument("--modes", default="local,remote")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    results = {mode: run_mode(args, mode) for mode in args.modes.split(",")}
    print(f"\n{machine()}; {now_utc()}; device {args.device}, model {args.model_dir or args.model_name}")
    print(f"{args.running} running DLLM requests (block {args.block_size}, {args.steps_per_block} steps), "
          f"burst of {args.burst} x {args.prompt_tokens} prompt tokens\n")
    print("| mode | block time p99 (ms) | p50 in window (ms) | p50 overall (ms) | burst TTFT (s) |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {1000 * r['block_time_p99_s']:.1f} | {1000 * r['block_time_p50_s']:.1f} | "
              f"{1000 * r['block_time_p50_s_overall']:.1f} | {max(r['burst_ttft_s']):.2f} |")
    if "local" in results and "remote" in results:
        ratio = results["remote"]["block_time_p99_s"] / results["local"]["block_time_p99_s"]
        results["ratio_p99_remote_over_local"] = ratio
        print(f"\nblock time p99 remote / local: {ratio:.2f}x (goal <= 0.5x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "base_url"},
                                               "machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
