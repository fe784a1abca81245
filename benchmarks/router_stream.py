"""Router CPU per streamed token, SSE events per token, and burst admission time.

    PYTHONPATH=$PWD python benchmarks/router_stream.py [--streams 1,64,256] [--step-ms 20]

Three processes besides this one, so that only the router is measured:
- the real router (`python -m cluster.router`) with its HTTP/SSE front end(s);
- a fake worker speaking the real wire protocol, one `tokens` message per step for every
  running request every `--step-ms` (fake_cluster.py, which also launches both);
- a streaming client on raw sockets: N connections opened beforehand, N `/v1/completions`
  streams of a ~130-token prompt sent at once, every SSE event read (so the client costs
  little CPU and sends the burst in microseconds).

Router CPU = user + system time of the router process and its children (front ends) over
the streaming window, divided by the tokens the client received; "dispatcher" is the router
process alone (with `--api-servers N` > 1, the dispatcher without its front ends). "events/token" is the SSE
content chunks the client saw per token (1.0 = every token sent as it arrived).
"threads_us_per_token": the same CPU per thread, each process's main thread (its event loop)
apart from the rest (the control socket's I/O thread, ZeroMQ's, tokenize, liveness). "steady_*":
CPU per SSE event from the moment every stream had its first token to the first [DONE] (no
admission, no first or last token; router_cpu.py).
"admission" is the time from the client's request to the worker's receipt of its
`generate` (p50 / max over the burst). The script measures whatever `cluster` package
PYTHONPATH names, so a `git worktree` of another commit can be compared with the same client.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Optional

ROUTER_CPU = None                                          # router_cpu.py, loaded by the driver


def _sibling(name: str):
    """A module of this directory, by its path (this file also runs as a script and is loaded by path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                            f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAKE = _sibling("fake_cluster")                             # the fake worker and the launcher
PROMPT = " ".join(f"word{i % 10}" for i in range(65))       # ~130 tokens


# --------------------------------------------------------------------------------- client

def request_bytes(host: str, port: int, max_tokens: int) -> bytes:
    body = json.dumps({"model": FAKE.MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def parse_stream(raw: bytes, sent: float, first: Optional[float]) -> dict:
    """One response as the client saw it: SSE content events, tokens (usage), how it ended."""
    head, _, body = raw.partition(b"\r\n\r\n")
    rid = re.search(rb"x-request-id: (\w+)", head, re.I)
    out = {"sent": sent, "events": 0, "tokens": 0, "ended": "cut", "rid": rid.group(1).decode() if rid else ""}
    if first is not None:
        out["first"] = first
    for data in re.findall(rb"data: (.*?)\n\n", body):    # chunk-size lines fall between events
        if data == b"[DONE]":
            out["ended"] = "done"
            break
        chunk = json.loads(data)
        if "error" in chunk:
            out["ended"] = "error"
            break
        if chunk.get("usage"):
            out["tokens"] = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["text"]:
            out["events"] += 1
    return out


def run_client(url: str, streams: int, max_tokens: int) -> None:
    """Raw sockets and one selector: opening the burst takes microseconds per request and
    reading costs little, so the client neither delays admission nor competes for the CPU."""
    import selectors
    host, port = url.split("//")[1].split(":")
    port = int(port)
    warm = socket.create_connection((host, port))          # warm: the router's first request
    warm.sendall(request_bytes(host, port, 2))
    while b"[DONE]" not in warm.recv(65536):
        pass
    warm.close()
    req = request_bytes(host, port, max_tokens)
    socks = [socket.create_connection((host, port)) for _ in range(streams)]
    print("READY", flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    sent = []
    for sock in socks:
        sent.append(time.monotonic())
        sock.sendall(req)
    sel = selectors.DefaultSelector()
    raw = [bytearray() for _ in socks]
    first: list[Optional[float]] = [None] * streams
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, i)
    left = streams
    num_started = num_events = 0                          # SSE events seen (a split "\n\n" is missed)
    while left:
        events = sel.select(timeout=120)
        if not events:
            break
        for key, _ in events:
            i = key.data
            data = key.fileobj.recv(1 << 16)
            num_events += data.count(b"\n\n")
            if first[i] is None and b'"text":"' in data and b'"text":""' not in data:
                first[i] = time.monotonic()
                num_started += 1
                if num_started == streams:                # the steady window opens: every stream under way
                    print("STEADY", num_events, flush=True)
            raw[i] += data
            tail = bytes(raw[i][-200:])
            if not data or b"data: [DONE]" in tail or b'data: {"error"' in raw[i]:
                if left == streams:                       # ... and closes: the first stream ended
                    print("ENDING", num_events, flush=True)
                sel.unregister(key.fileobj)
                key.fileobj.close()
                left -= 1
    t1 = time.monotonic()
    results = [parse_stream(bytes(r), t, f) for r, t, f in zip(raw, sent, first)]
    print(json.dumps({"t0": t0, "t1": t1, "results": results}), flush=True)


# --------------------------------------------------------------------------------- driver

def measure(url: str, router, streams: int, max_tokens: int, gen_log: str) -> dict:
    cpu_seconds, thread_seconds, per_thread, steady_window = (ROUTER_CPU.cpu_seconds, ROUTER_CPU.thread_seconds,
                                                              ROUTER_CPU.per_thread, ROUTER_CPU.steady_window)
    client = subprocess.Popen([sys.executable, __file__, "--role", "client", "--url", url,
                               "--streams", str(streams), "--max-tokens", str(max_tokens)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "READY"
    time.sleep(0.5)
    idle0, t_idle = cpu_seconds(router), time.monotonic()
    time.sleep(1.0)
    idle_rate = (cpu_seconds(router) - idle0) / (time.monotonic() - t_idle)
    spy = None
    if os.environ.get("ROUTER_PYSPY"):                     # a sampled profile of the window (py-spy)
        gil = ["--gil"] if os.environ.get("ROUTER_PYSPY_GIL") else []   # only the thread holding the GIL
        spy = subprocess.Popen(["py-spy", "record", "-p", str(router.pid), "-r", "1000", "-f", "raw", *gil,
                                "--nonblocking", "-o", f"{os.environ['ROUTER_PYSPY']}.{streams}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    cpu0, sys0, own0 = cpu_seconds(router), cpu_seconds(router, "system"), cpu_seconds(router, children=False)
    threads0 = thread_seconds(router)
    client.stdin.write("GO\n")
    client.stdin.flush()
    steady = {}                                           # marker -> (events so far, CPU, CPU per thread)
    line = client.stdout.readline()
    while line.startswith(("STEADY", "ENDING")):
        steady[line.split()[0]] = (int(line.split()[1]), cpu_seconds(router), thread_seconds(router))
        line = client.stdout.readline()
    report = json.loads(line)
    cpu, system = cpu_seconds(router) - cpu0, cpu_seconds(router, "system") - sys0
    own = cpu_seconds(router, children=False) - own0     # with front ends: the dispatcher's process alone
    threads = thread_seconds(router)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
    client.wait(timeout=30)
    results = report["results"]
    tokens = sum(r["tokens"] for r in results)
    events = sum(r["events"] for r in results)
    arrived = {}
    with open(gen_log) as f:
        for line in f:
            kind, rid, t = line.split()
            if kind == "G":
                arrived[rid.split(".")[0]] = float(t)
    admission = sorted(arrived[r["rid"]] - r["sent"] for r in results if r["rid"] in arrived)
    window = report["t1"] - report["t0"]
    return {"streams": streams, "tokens": tokens, "window_s": round(window, 2),
            "router_cpu_s": round(cpu, 3), "router_us_per_token": round(cpu / max(tokens, 1) * 1e6, 1),
            "dispatcher_us_per_token": round(own / max(tokens, 1) * 1e6, 1),
            "of_it_system_us": round(system / max(tokens, 1) * 1e6, 1),
            "threads_us_per_token": per_thread(router.pid, threads0, threads, tokens),
            "idle_cpu_per_s": round(idle_rate, 4), "events_per_token": round(events / max(tokens, 1), 3),
            "tok_per_s": round(tokens / window, 0),
            **steady_window(steady, router.pid),
            "admission_p50_ms": round(statistics.median(admission) * 1e3, 1) if admission else None,
            "admission_max_ms": round(admission[-1] * 1e3, 1) if admission else None,
            "ttft_p50_ms": round(statistics.median(r["first"] - r["sent"] for r in results if "first" in r) * 1e3, 1),
            "ended": {e: sum(r["ended"] == e for r in results) for e in {r["ended"] for r in results}}}


def main() -> None:
    global ROUTER_CPU
    ROUTER_CPU = _sibling("router_cpu")
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", default="driver", choices=["driver", "client"])
    ap.add_argument("--streams", default="1,64,256")
    ap.add_argument("--max-tokens", type=int, default=0, help="0: 200 at 1 stream, else 64")
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--api-servers", type=int, default=None, help="[router] api_servers, when the router has it")
    ap.add_argument("--url", default="")
    args = ap.parse_args()
    if args.role == "client":
        return run_client(args.url, int(args.streams), args.max_tokens)
    import psutil
    profile = ["-m", "cProfile", "-o", os.environ["ROUTER_CPROFILE"]] if os.environ.get("ROUTER_CPROFILE") else []
    with FAKE.fake_cluster(args.step_ms, args.api_servers, profile) as (url, router, gen_log):
        proc = psutil.Process(router.pid)
        for n in [int(s) for s in args.streams.split(",")]:
            max_tokens = args.max_tokens or (200 if n == 1 else 64)
            print(json.dumps(measure(url, proc, n, max_tokens, gen_log)), flush=True)

if __name__ == "__main__":
    main()
