"""The kernel's floor under router_stream's figure: CPU of one small `send` per stream per step
on loopback TCP, with nothing else per token.

    python benchmarks/loopback_send.py [--streams 256] [--steps 200] [--bytes 230]

A forked reader drains N connections with one selector (as router_stream's client does); this
process sends one `--bytes` chunk (a token's SSE event is ~230 bytes) to each connection per
20 ms step from a plain Python loop over non-blocking sockets (TCP_NODELAY, as uvicorn sets it)
and reports its own user and system CPU per send. On loopback the send also runs the
receiver's TCP input and wakes its reader, so this is what one event per token per stream
costs the router's process before any of its own work.
"""
from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--bytes", type=int, default=230)
    args = ap.parse_args()
    server = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = server.getsockname()[1]
    want = args.streams * args.steps * args.bytes
    pid = os.fork()
    if pid == 0:                                           # the reader
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.streams)]
        sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        got, deadline = 0, time.monotonic() + 60
        while got < want and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                got += len(key.fileobj.recv(1 << 16))
        os._exit(0)
    conns = [server.accept()[0] for _ in range(args.streams)]
    for c in conns:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.setblocking(False)
    chunk = b"x" * args.bytes
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.steps):
        for c in conns:
            c.send(chunk)
        time.sleep(0.02)
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.waitpid(pid, 0)
    n = args.streams * args.steps
    user, system = (after.ru_utime - before.ru_utime) / n * 1e6, (after.ru_stime - before.ru_stime) / n * 1e6
    print(f'{{"streams": {args.streams}, "sends": {n}, "user_us_per_send": {user:.2f}, '
          f'"system_us_per_send": {system:.2f}, "total_us_per_send": {user + system:.2f}}}')


if __name__ == "__main__":
    main()
