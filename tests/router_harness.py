"""A real router in this process (uvicorn on a free loopback port) and scripted workers
speaking the real protocol through ControlClient sockets, for the router tests
(tests/test_router_*.py; their fixtures `router`, `make_router`, `tokenizers` are in
tests/conftest.py)."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from typing import Callable, Optional

import httpx
import uvicorn

from cluster.config import default_config
from cluster.wire import protocol
from tests.cluster_harness import free_port

MODEL = "smollm2-135m-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 8}


class RunningRouter:
    """`frontend=True`: the path of `[router] api_servers` > 1 in one process: HTTP is served
    by a front end's RouterService over a DispatcherLink, the dispatcher has a FrontendHub."""

    def __init__(self, tokenizer_cache: dict, internal_token: str = "", frontend: bool = False, **sections):
        from cluster.router.__main__ import http_config
        from cluster.router.app import create_app
        from cluster.router.dispatcher import Dispatcher
        from cluster.router.service import RouterService
        cfg = default_config(env={})
        for name, fields in sections.items():
            if name == "groups":
                cfg = replace(cfg, groups=fields)
            else:
                cfg = replace(cfg, **{name: replace(getattr(cfg, name), **fields)})
        self.cfg = cfg
        self.dispatcher = Dispatcher(cfg, "tcp://127.0.0.1:0")
        self.control = self.dispatcher.start()
        self.service = RouterService(cfg, self.dispatcher)
        self.link = None
        if frontend:
            from cluster.router.dispatcher_link import DispatcherLink
            from cluster.router.frontend_hub import FrontendHub
            hub = FrontendHub(self.service, ["frontend-0"])
            self.dispatcher.frontends = self.service.metrics.frontends = hub
            self.link = DispatcherLink(cfg, "frontend-0", self.control)
            self.service = RouterService(cfg, self.link)         # the one HTTP serves from
            self.service.frontend_id = "frontend-0"
        self.service._tokenizers = tokenizer_cache
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        app = create_app(self.service, internal_token)
        self.server = uvicorn.Server(http_config(app, "127.0.0.1", port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60              # a bound on a hang, not on a loaded machine
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=5)
        if self.link is not None:
            self.link.close()
        self.dispatcher.close()


Reply = Callable[["ScriptedWorker", protocol.Generate], None]


class ScriptedWorker:
    """A worker process stand-in: registers, heartbeats, and answers `generate` via `reply`."""

    def __init__(self, endpoint: str, worker_id: str, role: str, model: str,
                 reply: Optional[Reply] = None, gauges: Optional[protocol.WorkerGauges] = None,
                 tp: int = 1):
        from cluster.wire.transport import ControlClient
        self.worker_id, self.role, self.reply = worker_id, role, reply
        self.gauges = gauges or protocol.WorkerGauges()
        self.received: list = []
        self.client = ControlClient(endpoint, worker_id)
        self.client.send(protocol.Register(
            worker_id=worker_id, role=role, model=model,
            capacity={"num_pages": 64, "page_size": 16, "max_running_requests": 8, "tp": tp},
            kv_fingerprint={"num_layers": 2, "num_kv_heads": 1, "head_dim": 8,
                            "dtype": "float32", "page_size": 16, "layout": "kv"},
            data_addr=f"tcp://127.0.0.1:1{abs(hash(worker_id)) % 9000 + 1000}", pid=1))
        self._stop = threading.Event()
        self.heartbeats = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            if self.heartbeats and time.monotonic() >= next_beat:
                self.client.send(protocol.Heartbeat(worker_id=self.worker_id, forward_ct=3,
                                                    gauges=self.gauges))
                next_beat = time.monotonic() + 0.2
            msg = self.client.recv(timeout=0.05)
            if msg is None:
                continue
            self.received.append(msg)
            if isinstance(msg, protocol.Generate) and self.reply is not None:
                self.reply(self, msg)

    def tokens(self, rid: str, ids: list[int], finish: Optional[str] = None,
               error: Optional[str] = None, logprobs=None) -> None:
        self.client.send(protocol.Tokens(worker_id=self.worker_id, items=[
            protocol.TokensItem(rid, list(ids), finish, error, logprobs)]))

    def plain_tokens(self, rids: list[str], ids: list[int]) -> None:
        """One steady decode step: one bare token per request, packed as the real worker sends it."""
        self.client.send(protocol.Tokens(worker_id=self.worker_id, items=[],
                                         plain=protocol.PlainTokens(list(rids), list(ids), forward_iter=7)))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
        self.client.close()


def register_again(worker, role: str) -> None:
    """The scripted worker ends a role switch: its `register` again, same pid, new role."""
    worker.role = role
    worker.client.send(protocol.Register(
        worker_id=worker.worker_id, role=role, model=MODEL,
        capacity={"num_pages": 64, "page_size": 16, "max_running_requests": 8, "tp": 1},
        kv_fingerprint={"num_layers": 2, "num_kv_heads": 1, "head_dim": 8, "dtype": "float32",
                        "page_size": 16, "layout": "kv"},
        data_addr="tcp://127.0.0.1:19999", pid=1))


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether `cond` came true within `timeout`: a bound on a hang, never what a healthy run on a
    loaded 2-core CI machine should trip over (every caller waits for something that must happen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def assert_error(resp: httpx.Response, status: int, *needles: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    for n in needles:
        assert n in body["error"]["message"], body
    return body["error"]


def pd_pair(r, reply_decode: Optional[Reply] = None, suffix: str = "0"):
    prefill = r.worker(f"prefill-{suffix}", "prefill", MODEL)
    decode = r.worker(f"decode-{suffix}", "decode", MODEL, reply=reply_decode)
    # this pair's own registration: a second pair must not be posted to before the router knows it
    directory = r.dispatcher.directory
    assert wait_for(lambda: directory.get(prefill.worker_id) is not None and directory.get(decode.worker_id) is not None)
    return prefill, decode


def sse_events(resp: httpx.Response) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out



def echo_reply(text_ids: list[int], finish: str = "length") -> Reply:
    def reply(worker, gen):
        for rid in [gen.rid, *gen.siblings]:        # a decode worker forks n > 1 choices (siblings)
            for i, t in enumerate(text_ids):
                last = i == len(text_ids) - 1
                worker.tokens(rid, [t], finish if last else None, logprobs=[-0.5])
    return reply



def generates(worker) -> list:
    """The `generate` messages a scripted worker received."""
    return [m for m in worker.received if isinstance(m, protocol.Generate)]


def stream_endings(base_url: str, body: dict, n: int, timeout: float = 120) -> list[str]:
    """Open `n` streams of `body` at once; how each ended: "done" ([DONE]), "error" (an error
    event), "ended without [DONE]", or "cut: <httpx error>" (the connection dropped)."""
    import asyncio

    async def burst():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as http:
            async def one():
                try:
                    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                        async for line in resp.aiter_lines():
                            if line == "data: [DONE]":
                                return "done"
                            if line.startswith("data: ") and '"error"' in line:
                                return "error"
                    return "ended without [DONE]"
                except httpx.HTTPError as e:
                    return f"cut: {type(e).__name__}"
            return await asyncio.gather(*(one() for _ in range(n)))
    return asyncio.run(burst())
