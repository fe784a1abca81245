"""Two trees' clusters side by side: CPU per streamed token of each process and thread, in the same seconds.

On a machine shared with others, runs one after another see different loads; here both trees'
`pdcluster launch CONFIG` (each on its own port) and their own `pdcluster bench` clients (one stream
each by default) run at once, and every process's threads are read over the same window
(schedstat, benchmarks/thread_cpu.py), tokens counted by each router's ITL histogram. Both clusters
share the cores, so TPOT is not the one-cluster figure; CPU per token and the A/B ratio are.

    python benchmarks/cpu_cluster_ab.py --trees /tmp/before,. [--window 15] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import thread_cpu as THREAD_CPU  # noqa: E402
from benchmarks.cpu_cluster import itl_count, wait_serving  # noqa: E402


def start(tree: str, config: str, port: int, args, tmp: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    """`tree`'s cluster on `port` and its bench client, streaming."""
    env = {**os.environ, "PYTHONPATH": tree}
    launch = subprocess.Popen([sys.executable, "-m", "cluster.launch.cli", "launch", config, "--port", str(port),
                               "--log-dir", os.path.join(tmp, f"logs-{port}")], env=env, cwd=tree,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_serving(launch)
    bench = subprocess.Popen([sys.executable, "-m", "cluster.launch.cli", "bench", "--url", f"http://127.0.0.1:{port}/v1",
                              "--num-requests", str(args.requests), "--concurrency", str(args.streams),
                              "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.tokens),
                              "--json", os.path.join(tmp, f"bench-{port}.json")],
                             env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return launch, bench


def processes(launch: subprocess.Popen, bench: subprocess.Popen) -> dict[str, int]:
    import psutil
    out = {}
    for p in psutil.Process(launch.pid).children():
        cmd = p.cmdline()
        if len(cmd) > 2:
            out[cmd[2].rsplit(".", 1)[-1]] = p.pid        # router, unified (one worker in these configs)
    out["bench"] = bench.pid
    return out


def one_round(trees: list[str], args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        try:
            for i, tree in enumerate(trees):
                runs.append(start(tree, args.config, args.port + i, args, tmp))
            time.sleep(args.after)
            procs = [processes(*r) for r in runs]
            names = [{k: THREAD_CPU.thread_names(pid) for k, pid in p.items()} for p in procs]
            before = [{k: THREAD_CPU.thread_seconds(pid) for k, pid in p.items()} for p in procs]
            counts, load0 = [itl_count(args.port + i) for i in range(len(trees))], os.getloadavg()[0]
            time.sleep(args.window)
            after = [{k: THREAD_CPU.thread_seconds(pid) for k, pid in p.items()} for p in procs]
            tokens = [itl_count(args.port + i) - counts[i] for i in range(len(trees))]
            load = [round(load0, 1), round(os.getloadavg()[0], 1)]
        finally:
            for launch, bench in runs:
                bench.kill()
                launch.send_signal(signal.SIGINT)
            for launch, _ in runs:
                try:
                    launch.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    launch.kill()
    out = []
    for tree, p, n, b, a, k in zip(trees, procs, names, before, after, tokens):
        if not k or any(not a[x] for x in p):
            raise RuntimeError(f"{tree}: the bench ended inside the window: raise --tokens or --requests")
        out.append({"tree": tree, "tokens": k, "window_s": args.window, "load": load,
                    **{x: THREAD_CPU.per_token_us(b[x], a[x], n[x], k) for x in p}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", required=True, help="two source trees, comma-separated (A,B)")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "unified.toml"))
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--prompt-len", type=int, default=200, help="words")
    ap.add_argument("--after", type=float, default=8.0, help="seconds after the benches start")
    ap.add_argument("--window", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=1, help="each round swaps which tree starts first")
    ap.add_argument("--port", type=int, default=8251)
    args = ap.parse_args()
    trees = [os.path.abspath(t) for t in args.trees.split(",")]
    for r in range(args.rounds):
        for row in one_round(trees if r % 2 == 0 else trees[::-1], args):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
