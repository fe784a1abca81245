"""A streamed POST over a plain asyncio connection: how `stream_timed` reads an http:// server.

httpx (through httpcore and anyio) pauses and resumes the socket's reader around every chunk (two
epoll_ctl calls) and runs h11 and three decoders per SSE event: ~0.3 ms of the client's CPU per
streamed token on a 2-core VM, taken from the cores of the server it measures. Here the protocol's
`data_received` takes the chunked body apart and hands over each `data:` payload as it arrives.
Connections are kept alive and reused, as httpx's pool does, so TTFT keeps its meaning.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Callable, Optional

MAX_HEAD_BYTES = 1 << 16
READ_TIMEOUT_S = 600.0          # as the httpx client's: this long without a byte fails the request


class HttpError(Exception):
    """A response the stream cannot be read from (bad framing, closed early)."""


def _is_data(line: bytes) -> bool:
    return line.startswith(b"data: ") and not line.startswith(b"data: [DONE]")


class SseSplitter:
    """An event stream's bytes, however split -> the payload of each `data: ` line but `[DONE]`, once
    its line is complete (`end()`: a last line without a newline)."""

    def __init__(self):
        self._rest = b""

    def feed(self, piece: bytes) -> list[bytes]:
        end = piece.rfind(b"\n")
        if end < 0:
            self._rest += piece
            return []
        lines, self._rest = (self._rest + piece[:end]).split(b"\n"), piece[end + 1:]
        return [line[6:] for line in lines if _is_data(line)]

    def end(self) -> list[bytes]:
        rest, self._rest = self._rest, b""
        return [rest[6:]] if _is_data(rest) else []


class SseResponse(asyncio.Protocol):
    """One connection; one response at a time. `on_data(payload)` for each `data: ` line."""

    def __init__(self):
        self.transport: Optional[asyncio.Transport] = None
        self.is_closed = False
        self.last_data = 0.0
        self._start(None)

    def _start(self, on_data: Optional[Callable[[bytes], None]]) -> None:
        self.on_data = on_data
        self.status, self.headers, self.body = 0, {}, bytearray()   # body: a non-200 answer's
        self.done: Optional[asyncio.Future] = None
        self._buf, self._sse = bytearray(), SseSplitter()
        self._head_done, self._chunk_left, self._content_left = False, 0, -1
        self._is_chunked = False

    def request(self, head: bytes, body: bytes, on_data: Callable[[bytes], None]) -> asyncio.Future:
        self._start(on_data)
        self.done = asyncio.get_running_loop().create_future()
        self.last_data = time.monotonic()
        self.transport.write(head + body)
        return self.done

    async def wait(self) -> int:
        """The response's status once it has ended; HttpError past READ_TIMEOUT_S of silence."""
        while True:
            await asyncio.wait({self.done}, timeout=READ_TIMEOUT_S)
            if self.done.done():
                return self.done.result()
            if time.monotonic() - self.last_data > READ_TIMEOUT_S:
                raise HttpError(f"no data for {READ_TIMEOUT_S:g} s")

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.is_closed = True
        if self.done is not None and not self.done.done():
            if self._head_done and not self._is_chunked and self._content_left < 0:
                self._finish()                        # a body framed by the connection's end
            else:
                self.done.set_exception(HttpError(f"connection closed mid-response ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        if self.done is None or self.done.done():
            return                                    # nothing asked: a stray byte, ignored
        try:
            self._take(data)
        except (HttpError, ValueError) as e:
            self.is_closed = True
            self.transport.close()
            self.done.set_exception(HttpError(str(e)))

    @property
    def has_head(self) -> bool:
        """The response's head has arrived (a request that failed before it may be sent again)."""
        return self._head_done

    # parsing
    def _take(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise HttpError("response head too long")
                return
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[:end + 4]
            self.status = int(lines[0].split(" ", 2)[1])
            self.headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            self._is_chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
            self._content_left = int(self.headers.get("content-length", -1)) if not self._is_chunked else -1
            self._head_done = True
        if not self._is_chunked:
            piece = bytes(buf) if self._content_left < 0 else bytes(buf[:self._content_left])
            del buf[:len(piece)]
            self._body(piece)
            if self._content_left >= 0:
                self._content_left -= len(piece)
                if self._content_left == 0:
                    self._finish()
            return
        while buf:
            if self._chunk_left > 0:                  # inside a chunk's data
                n = min(self._chunk_left, len(buf))
                self._body(bytes(buf[:n]))
                del buf[:n]
                self._chunk_left -= n
                if self._chunk_left == 0:
                    self._chunk_left = -1             # its closing CRLF next
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                return
            line = bytes(buf[:end])
            del buf[:end + 2]
            if self._chunk_left == -1:                # the CRLF after a chunk
                if line:
                    raise HttpError("chunk data longer than its size")
                self._chunk_left = 0
                continue
            if self._chunk_left == -2:                # after the last chunk: trailers, then an empty line
                if not line:
                    self._finish()
                    return
                continue
            size = int(line.split(b";", 1)[0], 16)
            self._chunk_left = size if size else -2

    def _body(self, piece: bytes) -> None:
        if self.status != 200:
            self.body += piece
            return
        for payload in self._sse.feed(piece):
            self.on_data(payload)

    def _finish(self) -> None:
        for payload in self._sse.end():
            self.on_data(payload)
        if self.headers.get("connection", "").lower() == "close":
            self.is_closed = True
            self.transport.close()
        self.done.set_result(self.status)


class RawStreams:
    """Keep-alive connections to one http:// server for streamed JSON POSTs."""

    def __init__(self, host: str, port: int, authorization: Optional[str] = None):
        self.host, self.port, self.authorization = host, port, authorization
        self._idle: list[SseResponse] = []

    async def post(self, path: str, body: dict, on_data: Callable[[bytes], None]) -> tuple[int, dict, bytes]:
        """POST `body` to `path`; `on_data` gets each SSE payload -> (status, headers (lower-case
        names), a non-200 answer's body)."""
        payload = json.dumps(body).encode()
        auth = f"Authorization: {self.authorization}\r\n" if self.authorization else ""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\n{auth}Content-Length: {len(payload)}\r\n\r\n").encode()
        conn = None
        while self._idle and conn is None:
            conn = self._idle.pop()
            conn = None if conn.is_closed else conn
        reused = conn is not None
        while True:
            if conn is None:
                _, conn = await asyncio.get_running_loop().create_connection(SseResponse, self.host, self.port)
            try:
                conn.request(head, payload, on_data)
                status = await conn.wait()
                break
            except HttpError:
                conn.transport.close()
                if not reused or conn.has_head:
                    raise
                conn, reused = None, False    # a kept-alive connection the server closed meanwhile: once more
            except BaseException:
                conn.transport.close()
                raise
        if not conn.is_closed:
            self._idle.append(conn)
        return status, conn.headers, bytes(conn.body)

    def close(self) -> None:
        for conn in self._idle:
            conn.transport.close()
        self._idle.clear()
