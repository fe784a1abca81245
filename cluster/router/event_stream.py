"""The SSE response and the client socket under it.

`EventStreamResponse` sends the start and the end through the ASGI stack as usual, and the
events straight to the server's own `send`, past the middlewares' per-message wrappers.

`ChunkWire` goes one step further, for the steady tokens of a stream: the body chunk is
framed here (HTTP/1.1 chunked encoding, `<hex size>\\r\\n<data>\\r\\n`, exactly what the
server's HTTP library writes) and written to the connection's transport, so a token reaches
its client from the one callback that hands a worker step to the HTTP loop, with no
coroutine woken per stream and no ASGI message built. It is only ever used while nothing is
pending in the ASGI path (mailbox.py), and only when the server is uvicorn with a chunked
response; anything else (another server, HTTP/1.0, HEAD) gets no wire and stays on `send`.
A paused transport (the client reads slower than the stream) or a gone client makes the
wire refuse, and the token takes the ASGI path, which waits for the socket to drain.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Optional

from starlette.responses import StreamingResponse

RAW_SEND = "pdcluster.send"     # scope key: the server's send, before any middleware wraps it
UVICORN_CYCLES = ("uvicorn.protocols.http.h11_impl", "uvicorn.protocols.http.httptools_impl")


class ChunkWire:
    """The chunked body of one uvicorn response, written to its transport."""

    __slots__ = ("cycle", "flow", "transport")

    def __init__(self, cycle):
        self.cycle, self.flow, self.transport = cycle, cycle.flow, cycle.transport

    @classmethod
    def of(cls, send, scope) -> Optional["ChunkWire"]:
        """The wire under `send` (uvicorn's RequestResponseCycle.send, after the response
        started), or None where the body is not chunk-framed by uvicorn."""
        cycle = getattr(send, "__self__", None)
        if (type(cycle).__module__ not in UVICORN_CYCLES or scope.get("http_version") != "1.1"
                or scope.get("method") == "HEAD" or not getattr(cycle, "response_started", False)
                or not all(hasattr(cycle, a) for a in ("flow", "transport", "disconnected"))):
            return None
        if hasattr(cycle, "chunked_encoding") and not cycle.chunked_encoding:   # httptools
            return None
        return cls(cycle)

    def is_writable(self) -> bool:
        # NOTE: a gone client's transport is closing before uvicorn marks the cycle disconnected
        # (connection_lost), so the cycle itself (a large object, cold per token) is not read
        return not (self.flow.write_paused or self.transport.is_closing())

    def write_parts(self, head: bytes, middle: bytes, tail: bytes) -> None:
        """`head + middle + tail` as one chunk, framed in one step (a token's event: no copy between)."""
        self.transport.write(b"%x\r\n%b%b%b\r\n" % (len(head) + len(middle) + len(tail), head, middle, tail))


class EventStreamResponse(StreamingResponse):
    """An SSE stream whose events go straight to the server's `send`. The start and the end
    pass through the middlewares as usual (they only note that the response started); the
    events skip their per-message wrappers, a third of the loop's time per event. Once the
    response has started, `wire` is its ChunkWire (or None)."""

    wire: Optional[ChunkWire] = None

    def __init__(self, events: Callable[[Callable[[], Optional[ChunkWire]]], AsyncIterator[bytes]],
                 headers: dict):
        """`events(wire)`: the body; `wire()` is this response's ChunkWire once it started."""
        super().__init__(events(lambda: self.wire), media_type="text/event-stream", headers=headers)

    async def __call__(self, scope, receive, send) -> None:
        """Starlette's streaming (stream; a client that disconnects cancels it) with two asyncio
        tasks in place of its anyio task group, whose cancel formats a task's repr: a tenth of
        a streamed request's admission CPU went to that machinery."""
        self._send_event = scope.get(RAW_SEND, send)
        self._scope = scope
        stream = asyncio.ensure_future(self.stream_response(send))
        listener = asyncio.ensure_future(self.listen_for_disconnect(receive))
        tasks = (stream, listener)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:                               # the other one (both, if this task is cancelled)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        if not stream.cancelled() and stream.exception() is not None:
            raise stream.exception()
        if self.background is not None:
            await self.background()

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        send_event = self._send_event
        self.wire = ChunkWire.of(send_event, self._scope)
        async for chunk in self.body_iterator:
            await send_event({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
