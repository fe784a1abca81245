"""A fake cluster for router benchmarks: the real router (`python -m cluster.router`) over a fake
unified worker that speaks the real wire protocol (ControlClient, msgpack) and whose forward costs
nothing: it registers, heartbeats, and answers each `generate` by streaming `max_tokens` tokens, one
`tokens` message per step for every running request (a decode batch), every `--step-ms`. Its log:
when each `generate` arrived (`G rid t`), the step at which each stream got its first token
(`F rid step`) and when each step left (`S step t`).

Used by router_stream.py and hop_latency.py; `python benchmarks/fake_cluster.py --endpoint E
--step-ms MS --log PATH` runs the worker alone (fake_cluster starts it so).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Optional

MODEL = "smollm2-135m-instruct"
TOKEN_IDS = [260, 2644, 2643, 335, 1171]                   # " the cat sat on mat": plain ASCII words

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def run_worker(endpoint: str, step_s: float, log_path: str) -> None:
    """A unified worker whose forward costs nothing: a fixed-rate decode step (its log: see the
    module docstring)."""
    from cluster.wire import protocol
    from cluster.wire.transport import ControlClient
    client = ControlClient(endpoint, "unified-0")
    fingerprint = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "dtype": "float32", "page_size": 16,
                   "layout": "kv"}
    try:
        register = protocol.Register(
            worker_id="unified-0", role="unified", model=MODEL, data_addr="", pid=os.getpid(),
            capacity={"num_pages": 65536, "page_size": 16, "max_running_requests": 1024, "tp": 1},
            kv_fingerprint=fingerprint)
        protocol.encode(register)
    except protocol.ProtocolError:                         # a tree from before KV layouts
        fingerprint.pop("layout")
        register = replace(register, kv_fingerprint=fingerprint)
    client.send(register)
    try:                                                   # heartbeats carry typed gauges
        from cluster.wire.gauges import WorkerGauges
        beat = {"gauges": WorkerGauges()}
    except ImportError:
        beat = {}
    plain = getattr(protocol, "PlainTokens", None)         # a tree from before packed steps: items only
    running: dict[str, list[int]] = {}                     # wire rid -> [left, sent]
    log = open(log_path, "w", buffering=1)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    next_step = next_beat = time.monotonic()
    forward_ct = 0
    while not stop:
        now = time.monotonic()
        if now >= next_beat:
            client.send(protocol.Heartbeat(worker_id="unified-0", forward_ct=forward_ct, **beat))
            next_beat = now + 0.5
        if now >= next_step:
            if running:
                forward_ct += 1
                items, plain_rids, plain_ids = [], [], []
                for rid, state in list(running.items()):
                    state[0] -= 1
                    state[1] += 1
                    if state[1] == 1:
                        log.write(f"F {rid} {forward_ct}\n")
                    token = TOKEN_IDS[state[1] % len(TOKEN_IDS)]
                    if state[0] > 0 and plain is not None:  # a steady row: packed, as the real worker sends it
                        plain_rids.append(rid)
                        plain_ids.append(token)
                        continue
                    items.append(protocol.TokensItem(rid, [token], "length" if state[0] <= 0 else None,
                                                     forward_iter=forward_ct))
                    if state[0] <= 0:
                        del running[rid]
                extra = {"plain": plain(plain_rids, plain_ids, forward_ct)} if plain_rids else {}
                client.send(protocol.Tokens(worker_id="unified-0", items=items, **extra))
                log.write(f"S {forward_ct} {time.monotonic():.6f}\n")
            next_step += step_s
            if next_step < now:                            # fell behind: no catch-up burst
                next_step = now + step_s
        msg = client.recv(timeout=max(0.0, min(next_step, next_beat) - time.monotonic()))
        while msg is not None:
            if isinstance(msg, protocol.Generate):
                log.write(f"G {msg.rid} {time.monotonic():.6f}\n")
                running[msg.rid] = [msg.sampling.max_tokens, 0]
            elif isinstance(msg, protocol.Abort):
                running.pop(msg.rid, None)
            msg = client.recv(timeout=0)
    log.close()
    client.close()


@contextlib.contextmanager
def fake_cluster(step_ms: float, api_servers: Optional[int] = None, python_args: tuple = ()):
    """The real router (`python -m cluster.router`, `api_servers` front ends) over this file's fake
    worker, up and healthy -> (url, router process, worker log); both stopped and the temp dir
    removed on exit. `python_args`: before the router's `-m` (a profiler)."""
    import httpx
    tmp = tempfile.mkdtemp(prefix="router-stream-")
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    config = os.path.join(tmp, "router.toml")
    with open(config, "w") as f:
        f.write("[router]\nmax_queued_requests = 4096\n")
        if api_servers is not None:
            f.write(f"api_servers = {api_servers}\n")
    router = subprocess.Popen([sys.executable, *python_args, "-m", "cluster.router", "--config", config,
                               "--port", str(port), "--control", control, "--log-dir", tmp])
    log = os.path.join(tmp, "worker.log")
    worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--endpoint", control,
                               "--step-ms", str(step_ms), "--log", log])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router at {url} was not healthy in 60 s (logs in {tmp})")
            time.sleep(0.2)
        yield url, router, log
    finally:
        for p in (worker, router):
            p.send_signal(signal.SIGTERM)
        for p in (worker, router):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    run_worker(args.endpoint, args.step_ms / 1e3, args.log)
