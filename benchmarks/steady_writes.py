"""The HTTP loop's CPU per steady token, against the kernel's floor under it.

    PYTHONPATH=$PWD python benchmarks/steady_writes.py [--streams 256] [--steps 600]

N loopback TCP connections accepted by an asyncio server (a forked reader drains them, as
router_stream's client does). Each 5 ms step hands every stream one token the way the
dispatcher does (`mailbox._put_all`), and the step's thread CPU is counted. Three writers take
turns step by step, so load on the machine hits them alike:
- `send`: `os.write` of a prebuilt 230-byte chunk to each socket in a bare loop (the floor);
- `transport`: asyncio's `transport.write` of the same chunk, in the same loop;
- `router`: the real hand-off (`mailbox._put_all`) into each stream's real steady writer (steady_stream.py: count, ITL, detokenize, the
  event from the request's template, one chunk on a ChunkWire over a uvicorn-like cycle).
`router` - `send` is what the router's own work costs per token; the script measures whatever
`cluster` PYTHONPATH names.
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import selectors
import socket
import time

from cluster.engine.model_files import load_tokenizer
from cluster.engine.tokenizer import IncrementalDetokenizer
from cluster.router import mailbox
from cluster.router.completion import CompletionText
from cluster.router.event_stream import ChunkWire
from cluster.router.metrics import RouterMetrics
from cluster.router.openai_response import ResponseWriter
from cluster.router.request_state import RequestState
from cluster.router.service import Generation
try:
    from cluster.router.steady_stream import SteadyStream as steady_writer
except ImportError:                                        # older trees: a writer function
    try:
        from cluster.router.steady_stream import steady_writer
    except ImportError:                                    # a tree from before steady_stream.py
        from cluster.router.service import RouterService
        steady_writer = RouterService.steady_writer
from cluster.sampling_params import SamplingParams

TOKEN_IDS = [260, 2644, 2643, 335, 1171]                   # " the cat sat on mat", as router_stream's worker
WRITERS = ("send", "transport", "router")
TWO_LISTS = len(inspect.signature(mailbox._put_all).parameters) == 3   # else (mailbox, token) pairs


class Cycle:
    """What ChunkWire reads of uvicorn's RequestResponseCycle."""
    def __init__(self, transport):
        self.flow, self.transport, self.disconnected = type("Flow", (), {"write_paused": False})(), transport, False


class Service:
    def __init__(self):
        self.metrics, self.dispatcher = RouterMetrics(lambda: 0), None


def read_all(port: int, streams: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    idle = time.monotonic()
    while time.monotonic() - idle < 2:
        for key, _ in sel.select(0.5):
            if key.fileobj.recv(1 << 16):
                idle = time.monotonic()
    os._exit(0)


async def run(streams: int, steps: int) -> dict:
    loop = asyncio.get_running_loop()
    transports = []
    server = await loop.create_server(lambda: type("P", (asyncio.Protocol,), {
        "connection_made": lambda self, t: transports.append(t)})(), "127.0.0.1", 0)
    pid = os.fork()
    if pid == 0:
        read_all(server.sockets[0].getsockname()[1], streams)
    while len(transports) < streams:
        await asyncio.sleep(0.01)
    tok, service, chunk = load_tokenizer(), Service(), b"%x\r\n%b\r\n" % (230, b"x" * 230)
    boxes, writers = [], []
    for i, t in enumerate(transports):
        box = mailbox.Mailbox(loop)
        st = RequestState(f"r{i}", "m", "pd", [1], SamplingParams(max_tokens=1 << 20), box)
        writer = ResponseWriter("completion", f"cmpl-{i:032x}", "smollm2-135m-instruct", tok, None, None, True)
        gen = Generation(st, box, CompletionText(IncrementalDetokenizer(tok), []), writer, 1, time.monotonic())
        fd = t.get_extra_info("socket").fileno()
        writers.append({"send": lambda _, fd=fd: bool(os.write(fd, chunk)),
                        "transport": lambda _, t=t: not t.write(chunk)})
        box.steady = steady_writer(service, gen, ChunkWire(Cycle(t)))
        box.waiter = loop.create_future()                  # the stream's coroutine waits: tokens go steady
        boxes.append(box)
    cpu = dict.fromkeys(WRITERS, 0.0)
    for step in range(steps):
        name = WRITERS[step % len(WRITERS)]
        hand = [TOKEN_IDS[step % len(TOKEN_IDS)]] * streams
        t0 = time.thread_time()
        if name == "router":                               # the real hand-off, into the real writers
            mailbox._put_all(*(([], boxes, hand) if TWO_LISTS else ([], list(zip(boxes, hand)))))
        else:                                              # a bare loop over the sockets
            for w, token_id in zip(writers, hand):
                w[name](token_id)
        cpu[name] += time.thread_time() - t0
        await asyncio.sleep(0.005)
    server.close()
    os.waitpid(pid, 0)
    n = streams * steps / len(WRITERS)
    out = {name: round(cpu[name] / n * 1e6, 2) for name in WRITERS}
    return {**out, "router_minus_send": round(out["router"] - out["send"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    print({"streams": args.streams, "thread_cpu_us_per_token": asyncio.run(run(args.streams, args.steps))})


if __name__ == "__main__":
    main()
