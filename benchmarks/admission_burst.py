"""TTFT of a burst through a unified cluster whose forward costs nothing: the admission host path.

    PYTHONPATH=$PWD python benchmarks/admission_burst.py [--streams 256] [--max-tokens 16] [--rounds 2]
        [--max-prefill-tokens N] [--prefix-cache] [--api-servers N] [--tree DIR] [--pyspy PREFIX]

Three processes besides this one:
- the real router (`python -m cluster.router`, run through this file to log its GC passes);
- the real unified worker (`cluster.runtime.worker_main.run_worker`, UnifiedScheduler, control
  socket, heartbeats) over a real `ModelRunner` of a one-layer dummy model with the default
  vocabulary, whose forward returns at once (`host_path.zero_cost_forward`), so every second
  measured is host path; it logs when each `generate` reached its scheduler thread;
- router_stream's raw-socket client: N streams of a ~130-token prompt sent at once.

Each request's first token is traced from the client's send through the router's marks
(`/debug/requests/{id}`) and the worker's, and each boundary is reported as p50 / p99 over the
burst of its offset from the send:

    arrival          the router began the request (HTTP parsed; tokenizing next)
    dispatched       `generate` handed to the control socket
    worker_recv      the worker's scheduler thread took the `generate`
    prefill_launched the prefill batch holding its prompt was launched
    prefill_done     its first token was committed (the batch's result processed)
    router_token     the `tokens` message with it reached the router's control loop
    client_token     the client read it (TTFT)

plus the worker's prefill batches (how many, prompts per batch), each process's CPU seconds
over the burst (steadier than wall time on a shared machine) and its cyclic-GC passes over
1 ms (count, total and longest ms). The prefix cache is off unless `--prefix-cache`: every
stream sends the same prompt. `--tree DIR` runs the router and worker from another checkout
(a `git worktree` of another commit) with this same client and worker stand-in.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def sibling(name: str):
    """A module of this directory by its path: with --tree, `cluster` is the tree's, the benchmark is this one."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


router_stream, fake_cluster = sibling("router_stream"), sibling("fake_cluster")
MODEL, TOKEN_IDS, free_port, run_client = (fake_cluster.MODEL, fake_cluster.TOKEN_IDS, fake_cluster.free_port,
                                           router_stream.run_client)

BOUNDARIES = ("arrival", "dispatched", "worker_recv", "prefill_launched", "prefill_done", "router_token",
              "client_token")


# ---------------------------------------------------------------------------- processes

def log_collections(path: str) -> None:
    """Every cyclic-GC pass of this process over 1 ms, as `end_unix_s generation seconds` lines."""
    import gc
    started = [0.0]
    out = open(path, "a", buffering=1)

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if took > 1e-3:
            out.write(f"{time.time():.6f} {info['generation']} {took:.6f}\n")
    gc.callbacks.append(on_gc)


def run_router(argv: list[str], gc_log: str) -> None:
    import runpy
    log_collections(gc_log)
    sys.argv = ["cluster.router", *argv]
    runpy.run_module("cluster.router", run_name="__main__", alter_sys=True)


def run_worker(argv: list[str], recv_log: str, gc_log: str) -> int:
    """The real unified worker entry, its model swapped for a zero-cost one."""
    import torch
    import cluster  # noqa: F401  NOTE: first: host_path puts this checkout on sys.path, --tree's must win
    host_path = sibling("host_path")
    from cluster.engine.model_files import load_tokenizer
    from cluster.engine.model_runner import ModelRunner
    from cluster.runtime import worker_main
    from cluster.unified import UnifiedScheduler, build
    from cluster.wire import protocol as P

    def load_runner(config, group, *args, **kwargs):
        s = group.scheduler
        runner = ModelRunner(host_path.tiny_model(load_tokenizer()), s.num_pages, s.page_size)
        runner.forward = host_path.zero_cost_forward(runner, TOKEN_IDS[0])   # a word: the client sees text
        return runner

    log_collections(gc_log)
    log = open(recv_log, "w", buffering=1)
    handle = UnifiedScheduler.handle_control

    def handle_control(self, msg):
        if isinstance(msg, P.Generate):
            log.write(f"{msg.rid} {time.time():.6f}\n")
        handle(self, msg)
    UnifiedScheduler.handle_control = handle_control
    worker_main.load_runner = load_runner
    torch.set_num_threads(1)
    return worker_main.run_worker("unified", argv, build)


# ---------------------------------------------------------------------------- driver

def write_config(path: str, args) -> None:
    """One unified worker sized for the burst; the prefix cache off unless asked: every stream
    sends the same prompt, which distinct prompts would not share."""
    with open(path, "w") as f:
        f.write(f'[model]\nname = "{MODEL}"\n\n[router]\nmax_queued_requests = {4 * args.streams}\n'
                + (f'api_servers = {args.api_servers}\n' if args.api_servers >= 0 else '') + '\n'
                f'[scheduler]\nnum_pages = {args.streams * 16 + 256}\nmax_running_requests = {args.streams}\n'
                + (f'max_prefill_tokens = {args.max_prefill_tokens}\n' if args.max_prefill_tokens else '')
                + f'\n[cache]\nprefix_cache = {str(args.prefix_cache).lower()}\n\n[[unified]]\ncount = 1\n')


class Cluster:
    """The router and the zero-cost worker, from `tree`, with their logs in one temp dir."""

    def __init__(self, args):
        self.dir = tempfile.mkdtemp(prefix="admission-burst-")
        port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{port}"
        config = os.path.join(self.dir, "cluster.toml")
        write_config(config, args)
        tree = os.path.abspath(args.tree) if args.tree else os.path.dirname(HERE)
        env = {**os.environ, "PYTHONPATH": tree}            # NOTE: this file runs them; `cluster` is tree's
        self.log = {name: os.path.join(self.dir, f"{name}.log") for name in ("generate", "gc-router", "gc-worker")}
        self.router = subprocess.Popen(
            [sys.executable, __file__, "--role", "router", "--gc-log", self.log["gc-router"], "--config", config,
             "--port", str(port), "--control", control, "--log-dir", self.dir], env=env, cwd=tree)
        self.worker = subprocess.Popen(
            [sys.executable, __file__, "--role", "worker", "--recv-log", self.log["generate"], "--gc-log",
             self.log["gc-worker"], "--config", config, "--worker-id", "unified-0", "--router", control,
             "--log-dir", self.dir], env=env, cwd=tree)
        self.worker_log = os.path.join(self.dir, "unified-0.log")

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds of each process so far (all its threads)."""
        import psutil
        return {name: sum(psutil.Process(p.pid).cpu_times()[:2])
                for name, p in (("router", self.router), ("worker", self.worker))}

    def close(self) -> None:
        for p in (self.worker, self.router):
            p.send_signal(signal.SIGTERM)
        for p in (self.worker, self.router):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def read_lines(path: str, start: int = 0) -> tuple[list[list[str]], int]:
    """The lines of `path` from byte `start`, split; and the end offset."""
    with open(path) as f:
        f.seek(start)
        text = f.read()
    return [line.split() for line in text.splitlines()], start + len(text.encode())


def first_token_marks(http, url: str, result: dict, skew: float, recv: dict) -> dict[str, float]:
    """Wall-clock moments of one stream's first token on its way (BOUNDARIES)."""
    trace = http.get(f"{url}/debug/requests/{result['rid']}").json()
    start = trace["arrival_unix_s"]
    marks = {"arrival": start}
    for p in trace["phases"]:
        end = {"router_queue": "dispatched", "prefill_queue": "prefill_launched",
               "prefill_forward": "prefill_done"}.get(p["phase"])
        if end and p["end_s"] is not None:
            marks[end] = start + p["end_s"]
    if trace["tokens"]:
        marks["router_token"] = start + trace["tokens"][0]["t_s"]
    if result["rid"] in recv:
        marks["worker_recv"] = recv[result["rid"]]
    marks["client_token"] = result["first"] + skew
    return marks


def burst(cluster: Cluster, streams: int, max_tokens: int, pyspy: str = "") -> dict:
    """One burst of `streams` at once; `pyspy` PREFIX: py-spy profiles of the router and the
    worker over it (PREFIX.router.txt, PREFIX.worker.txt: raw, for flamegraph.pl)."""
    import httpx
    from benchmarks.common import quantile
    client = subprocess.Popen([sys.executable, __file__, "--role", "client", "--url", cluster.url,
                               "--streams", str(streams), "--max-tokens", str(max_tokens)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "READY"
    time.sleep(0.5)
    skew = time.time() - time.monotonic()                  # the client's monotonic times -> wall clock
    offsets = {name: os.path.getsize(path) for name, path in cluster.log.items()}
    log_start = os.path.getsize(cluster.worker_log)
    spies = [subprocess.Popen(["py-spy", "record", "-p", str(p.pid), "-r", "200", "-f", "raw", "--nonblocking",
                               "-o", f"{pyspy}.{name}.txt"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, p in (("router", cluster.router), ("worker", cluster.worker)) if pyspy]
    time.sleep(1.0 if spies else 0)
    cpu0 = cluster.cpu_seconds()
    client.stdin.write("GO\n")
    client.stdin.flush()
    line = client.stdout.readline()
    while line and not line.startswith("{"):              # the client's STEADY / ENDING marks come first
        line = client.stdout.readline()
    report = json.loads(line)
    cpu = {name: round(t - cpu0[name], 2) for name, t in cluster.cpu_seconds().items()}
    client.wait(timeout=30)
    for spy in spies:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
    results = report["results"]
    recv = {rid.split(".")[0]: float(t) for rid, t in read_lines(cluster.log["generate"], offsets["generate"])[0]}
    moments: dict[str, list[float]] = {b: [] for b in BOUNDARIES}
    with httpx.Client(timeout=10) as http:
        for r in results:
            if "first" in r and r["rid"]:
                sent = r["sent"] + skew
                for b, t in first_token_marks(http, cluster.url, r, skew, recv).items():
                    moments[b].append(t - sent)
    with open(cluster.worker_log) as f:
        f.seek(log_start)
        batches = [int(n) for n in re.findall(r"Prefill batch \[\d+\], #new-seq: (\d+)", f.read())]
    t0, t1 = report["t0"] + skew, report["t1"] + skew
    out = {"streams": streams, "ended": {e: sum(r["ended"] == e for r in results) for e in {r["ended"] for r in results}},
           "prefill_batches": len(batches), "prompts_per_batch": f"{min(batches)}-{max(batches)}" if batches else "-"}
    for b in moments:
        v = moments[b]
        out[b] = [round(quantile(v, 0.5) * 1e3, 1), round(quantile(v, 0.99) * 1e3, 1)] if v else None
    out["cpu_s"] = cpu
    for name in ("router", "worker"):                       # cyclic GC passes during the burst
        passes = [float(d) for t, _, d in read_lines(cluster.log[f"gc-{name}"], offsets[f"gc-{name}"])[0]
                  if t0 <= float(t) <= t1]
        out[f"gc_{name}_ms"] = [len(passes), round(sum(passes) * 1e3, 1), round(max(passes, default=0) * 1e3, 1)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="driver", choices=["driver", "router", "worker", "client"])
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="bursts, one after the other, on one cluster")
    ap.add_argument("--max-prefill-tokens", type=int, default=0, help="[scheduler] key; 0: the default")
    ap.add_argument("--prefix-cache", action="store_true", help="[cache] prefix_cache (default off)")
    ap.add_argument("--api-servers", type=int, default=-1, help="[router] api_servers (-1: the default, 1 on 2 cores)")
    ap.add_argument("--tree", default="", help="run the router and worker from this checkout")
    ap.add_argument("--pyspy", default="", help="PREFIX: py-spy profiles of the router and the worker "
                    "over the last burst")
    ap.add_argument("--url", default="")
    ap.add_argument("--recv-log", default="")
    ap.add_argument("--gc-log", default="")
    args, rest = ap.parse_known_args()
    if args.role == "router":
        return run_router(rest, args.gc_log)
    if args.role == "worker":
        return run_worker(rest, args.recv_log, args.gc_log)
    if args.role == "client":
        return run_client(args.url, args.streams, args.max_tokens)
    from benchmarks.common import wait_healthy
    cluster = Cluster(args)
    try:
        wait_healthy(cluster.url)
        for i in range(args.rounds):
            print(json.dumps(burst(cluster, args.streams, args.max_tokens,
                                   args.pyspy if i == args.rounds - 1 else "")), flush=True)
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
