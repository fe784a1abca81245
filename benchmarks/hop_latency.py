"""How long a streamed token takes from the worker's send to the client: the router's hops.

    PYTHONPATH=$PWD python benchmarks/hop_latency.py [--streams 64] [--max-tokens 128] [--step-ms 20]
        [--api-servers 1,2] [--rounds 2]

The real router (`python -m cluster.router`, one process or `--api-servers` N front ends over a
dispatcher) between router_stream's fake worker protocol and a raw-socket client. The fake worker
sends one `tokens` message per step (every running stream gets one token, packed as the real
worker sends steady rows) and logs the moment each step left and the step at which each stream
got its first token; the client stamps every read. Token k of a stream left at its first step + k,
so each token's latency is its read time minus that step's send time (the same host clock), with no
hook in the router. Reported per api_servers value: p50 / p90 / p99 of that latency (ms) over every
steady token (the first two of each stream are left out: admission), SSE events per token and the
router's CPU. With one front end the path is worker -> router process -> client; with N it is
worker -> dispatcher -> front end -> client: the difference is the front-end hop.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_router_stream", os.path.join(HERE, "router_stream.py"))
router_stream = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(router_stream)


def run_client(url: str, streams: int, max_tokens: int) -> None:
    """Every read stamped: [(monotonic time, bytes)] per stream, printed as JSON."""
    host, port = url.split("//")[1].split(":")
    req = router_stream.request_bytes(host, int(port), max_tokens)
    socks = [socket.create_connection((host, int(port))) for _ in range(streams)]
    print("READY", flush=True)
    sys.stdin.readline()
    for sock in socks:
        sock.sendall(req)
    sel = selectors.DefaultSelector()
    reads: list[list] = [[] for _ in socks]
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, i)
    left = streams
    while left:
        events = sel.select(timeout=60)
        if not events:
            break
        for key, _ in events:
            data = key.fileobj.recv(1 << 16)
            reads[key.data].append((time.monotonic(), data.decode("latin-1")))
            if not data or "data: [DONE]" in data.decode("latin-1")[-64:]:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                left -= 1
    print(json.dumps(reads), flush=True)


def token_times(reads: list) -> tuple[str, list[float], int]:
    """(rid, read time of each token in order, SSE events with text) of one stream's reads."""
    raw, ends = "", []
    for t, data in reads:
        raw += data
        ends.append((len(raw), t))
    rid = re.search(r"x-request-id: (\w+)", raw, re.I)
    times, num_events = [], 0
    for m in re.finditer(r'data: (\{.*?\})\n\n', raw):
        text = json.loads(m.group(1))["choices"][0]["text"] if '"choices":[{' in m.group(1) else ""
        if text:
            num_events += 1
            t = next(t for end, t in ends if end >= m.end())
            times += [t] * text.count(" ")
    return (rid.group(1) if rid else ""), times, num_events


def measure(url: str, router_pid: int, args, log_path: str) -> dict:
    import psutil
    from benchmarks.common import quantile
    client = subprocess.Popen([sys.executable, __file__, "--role", "client", "--url", url, "--streams",
                               str(args.streams), "--max-tokens", str(args.max_tokens)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "READY"
    router = psutil.Process(router_pid)
    cpu = lambda: sum(sum(p.cpu_times()[:2]) for p in [router] + router.children(recursive=True))  # noqa: E731
    start = os.path.getsize(log_path)
    cpu0 = cpu()
    client.stdin.write("GO\n")
    client.stdin.flush()
    reads = json.loads(client.stdout.readline())
    cpu_s = cpu() - cpu0
    client.wait(timeout=30)
    sent, first = {}, {}
    with open(log_path) as f:
        f.seek(start)
        for line in f:
            kind, a, b = line.split()
            if kind == "S":
                sent[int(a)] = float(b)
            elif kind == "F":
                first[a.split(".")[0]] = int(b)
    latencies, tokens, events = [], 0, 0
    for stream in reads:
        rid, times, num_events = token_times(stream)
        tokens, events = tokens + len(times), events + num_events
        s0 = first.get(rid)
        if s0 is not None:
            latencies += [t - sent[s0 + k] for k, t in enumerate(times) if k >= 2 and s0 + k in sent]
    ms = lambda q: round(quantile(latencies, q) * 1e3, 2) if latencies else None   # noqa: E731
    return {"api_servers": args.api_servers_now, "streams": args.streams, "tokens": tokens,
            "latency_ms_p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99),
            "events_per_token": round(events / max(tokens, 1), 3),
            "router_us_per_token": round(cpu_s / max(tokens, 1) * 1e6, 1),
            "load": open("/proc/loadavg").read().split()[0]}


def cluster(args, api_servers: int) -> list[dict]:
    with router_stream.FAKE.fake_cluster(args.step_ms, api_servers) as (url, router, log_path):
        args.api_servers_now = api_servers
        return [measure(url, router.pid, args, log_path) for _ in range(args.rounds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="driver", choices=["driver", "client"])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--api-servers", default="1,2", help="[router] api_servers values, run in turn")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--url", default="")
    args = ap.parse_args()
    if args.role == "client":
        return run_client(args.url, args.streams, args.max_tokens)
    for n in [int(x) for x in args.api_servers.split(",")]:
        for result in cluster(args, n):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
