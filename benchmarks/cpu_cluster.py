"""The default model on the CPU: one config served through the cluster against the engine alone, side by side.

Each round measures the engine alone (ModelRunner forwards in this process, one greedy stream,
the worker's torch thread count) and then, per variant, the cluster (`pdcluster launch CONFIG`
in its own processes, `pdcluster bench` as the client in another): median TPOT and output
tok/s. Variants are environment settings of the launched cluster (`NAME=VALUE,...`; a PYTHONPATH
naming another tree runs that tree's cluster and client), tried in turn within each round, so a
shared machine's load falls on all of them alike; compare the ratios within a run.

    python benchmarks/cpu_cluster.py                                    # 1 stream, 2 rounds
    python benchmarks/cpu_cluster.py --streams 16 --requests 32 --rounds 1
    python benchmarks/cpu_cluster.py --variants "default;OMP_WAIT_POLICY=ACTIVE"
    python benchmarks/cpu_cluster.py --requests 3 --tokens 600 --cpu-window 12   # + CPU per token per thread
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import thread_cpu as THREAD_CPU  # noqa: E402
from benchmarks.cpu_decode import PROMPT, one_stream  # noqa: E402
from cluster.engine.llm import LLM  # noqa: E402
from cluster.engine.quant_linear import describe_cpu  # noqa: E402

READY_TIMEOUT_S = 180


def parse_variant(text: str) -> dict[str, str]:
    """"default" -> {}; "A=1,B=2" -> {"A": "1", "B": "2"}."""
    if text.strip() in ("", "default"):
        return {}
    return dict(kv.split("=", 1) for kv in text.split(","))


def engine_ms(llm: LLM, threads: int, tokens: int) -> tuple[float, float]:
    """ms per token on this (the main) thread, and on a second thread as a worker runs its forwards.
    The two differ in libgomp's wait: a process whose threads outnumber the cores (the worker: the main
    thread loaded the model with its own team) spins ~100 iterations before sleeping; this one alone
    spins ~300,000 (fast on an idle machine, a stall at every region when another process holds a core)."""
    ids = llm.tokenizer.encode(PROMPT)
    out = []

    def measure():
        torch.set_num_threads(threads)
        with torch.inference_mode():
            one_stream(llm, ids[:32], 4)    # warm-up
            out.append(one_stream(llm, ids, tokens)[1] * 1e3)
    measure()
    thread = threading.Thread(target=measure)
    thread.start()
    thread.join()
    return out[0], out[1]


def serve_and_bench(config: str, port: int, env: dict[str, str], args) -> dict:
    """Launch the config on `port` with `env`, run one `pdcluster bench`, stop; -> the bench summary."""
    with open(config) as f:
        text = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = os.path.join(tmp, "cluster.toml")
        with open(cfg_path, "w") as f:
            f.write(text)
        launch = subprocess.Popen([sys.executable, "-m", "cluster.launch.cli", "launch", cfg_path, "--port", str(port),
                                   "--log-dir", os.path.join(tmp, "logs")],
                                  env={**os.environ, "PYTHONPATH": ROOT, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True,
                                  cwd=env.get("PYTHONPATH", ROOT))   # NOTE: `-m` puts the cwd first on sys.path
        try:
            wait_serving(launch)
            out = os.path.join(tmp, "bench.json")
            bench = subprocess.Popen([sys.executable, "-m", "cluster.launch.cli", "bench", "--url",
                                      f"http://127.0.0.1:{port}/v1", "--num-requests", str(args.requests),
                                      "--concurrency", str(args.streams), "--prompt-len", str(args.prompt_len),
                                      "--max-tokens", str(args.tokens), "--json", out],
                                     env={**os.environ, "PYTHONPATH": env.get("PYTHONPATH", ROOT)},
                                     cwd=env.get("PYTHONPATH", ROOT), stdout=subprocess.DEVNULL)   # the variant's client
            cpu = cpu_window(launch.pid, bench.pid, port, args) if args.cpu_window else None
            if bench.wait(timeout=600) != 0:
                raise RuntimeError(f"pdcluster bench exited with {bench.returncode}")
            with open(out) as f:
                summary = {**json.load(f), "cpu_us_per_token": cpu}
            summary.update(prefix_cache_tokens(port))
            return summary
        finally:
            launch.send_signal(signal.SIGINT)
            try:
                launch.wait(timeout=60)
            except subprocess.TimeoutExpired:
                launch.kill()


def itl_count(port: int) -> int:
    """Inter-token gaps the router has timed so far (one per streamed token after a stream's first)."""
    import httpx
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("pdcluster:inter_token_latency_seconds_count")))


def cpu_window(launch_pid: int, bench_pid: int, port: int, args) -> dict:
    """CPU per streamed token of each process (the router, each worker, the bench client) and its
    threads over `--cpu-window` seconds of steady streaming, `--cpu-after` seconds into the bench."""
    import psutil
    time.sleep(args.cpu_after)
    procs = {p.cmdline()[2].rsplit(".", 1)[-1] + (f"-{p.pid}" if "router" not in p.cmdline()[2] else ""): p.pid
             for p in psutil.Process(launch_pid).children() if len(p.cmdline()) > 2}
    procs["bench"] = bench_pid
    names = {k: THREAD_CPU.thread_names(pid) for k, pid in procs.items()}
    before = {k: THREAD_CPU.thread_seconds(pid) for k, pid in procs.items()}
    n0, load0 = itl_count(port), os.getloadavg()[0]
    time.sleep(args.cpu_window)
    after = {k: THREAD_CPU.thread_seconds(pid) for k, pid in procs.items()}
    tokens = itl_count(port) - n0
    if not tokens or any(not a for a in after.values()):
        raise RuntimeError("the bench ended inside the CPU window: raise --tokens or --requests")
    return {"tokens": tokens, "load": [round(load0, 1), round(os.getloadavg()[0], 1)],
            **{k: THREAD_CPU.per_token_us(before[k], after[k], names[k], tokens) for k in procs}}


def prefix_cache_tokens(port: int) -> dict[str, float]:
    """The workers' prefix-cache hit and query tokens, summed from the router's /metrics (from
    the last heartbeats: a second's worth may be missing)."""
    import urllib.request
    time.sleep(1.5)   # a heartbeat after the last request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {"cache_hit_tokens": 0.0, "cache_query_tokens": 0.0}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name == "pdcluster:prefix_cache_hit_tokens_total":
            out["cache_hit_tokens"] += float(line.rsplit(" ", 1)[1])
        elif name == "pdcluster:prefix_cache_query_tokens_total":
            out["cache_query_tokens"] += float(line.rsplit(" ", 1)[1])
    return out


def wait_serving(launch: subprocess.Popen) -> None:
    """Until `pdcluster launch` prints that it serves (every worker registered), or fails."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for line in launch.stdout:
        if line.startswith("pdcluster: serving"):
            return
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"pdcluster launch did not serve (exit code {launch.poll()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "unified.toml"))
    ap.add_argument("--variants", default="default", help="';'-separated env settings of the cluster")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=200, help="words")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engine-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--port", type=int, default=8231)
    ap.add_argument("--cpu-window", type=float, default=0.0,
                    help="> 0: also CPU per token per process and thread over this many seconds of the bench")
    ap.add_argument("--cpu-after", type=float, default=5.0, help="seconds into the bench the CPU window opens")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(";")]
    llm = LLM(num_pages=64, page_size=16) if args.streams == 1 else None
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, {describe_cpu()}, "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    engine: list[float] = []
    for r in range(args.rounds):
        if llm is not None:
            main_ms, thread_ms = engine_ms(llm, args.engine_threads, args.tokens)
            engine.append(main_ms)
            print(f"round {r}: engine alone {main_ms:.2f} ms/token on the main thread, {thread_ms:.2f} on a forward "
                  f"thread ({args.engine_threads} threads; load {os.getloadavg()[0]:.1f})", flush=True)
        for v in variants:
            s = serve_and_bench(args.config, args.port, parse_variant(v), args)
            rows[v].append((s["median_tpot_ms"], s["output_throughput"]))
            ratio = f" = {s['median_tpot_ms'] / engine[-1]:.2f}x the engine" if engine else ""
            print(f"round {r}: {v}: TPOT median {s['median_tpot_ms']:.2f} ms{ratio}, "
                  f"{s['output_throughput']:.1f} tok/s, TTFT median {s['median_ttft_ms']:.0f} ms "
                  f"p99 {s['p99_ttft_ms']:.0f} ms, prefix-cache hits {s['cache_hit_tokens']:.0f} of "
                  f"{s['cache_query_tokens']:.0f} tokens ({s['completed']} of {args.requests} completed; "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
            if s["cpu_us_per_token"]:
                print(f"round {r}: {v}: CPU us per token {json.dumps(s['cpu_us_per_token'])}", flush=True)
    for v, xs in rows.items():
        best = min(t for t, _ in xs)
        print(f"best {v}: TPOT {best:.2f} ms, {max(x for _, x in xs):.1f} tok/s"
              + (f", engine best {min(engine):.2f} ms, ratio of medians "
                 f"{statistics.median(t for t, _ in xs) / statistics.median(engine):.2f}x" if engine else ""))


if __name__ == "__main__":
    main()
