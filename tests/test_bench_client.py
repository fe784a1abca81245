"""`pdcluster bench`'s own SSE parse: every `data:` payload once, whatever the chunking."""
import asyncio
import json

import httpx

from cluster.bench.client import sse_data, stream_timed

EVENTS = [{"choices": [{"text": t}]} for t in ("Hel", "lo", "", " wor", "ld")] + [
    {"choices": [], "usage": {"completion_tokens": 4, "prompt_tokens": 3}}]
BODY = "".join(f"data: {json.dumps(e)}\n\n" for e in EVENTS).encode() + b"data: [DONE]\n\n"


class Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks):
        self.chunks = chunks

    async def __aiter__(self):
        for c in self.chunks:
            yield c


def client_over(chunks) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url="https://x", transport=httpx.MockTransport(   # https: the httpx path
        lambda request: httpx.Response(200, stream=Chunks(chunks))))


def payloads(chunks) -> list:
    async def run():
        async with client_over(chunks) as client, client.stream("GET", "/") as resp:
            return [json.loads(d) async for d in sse_data(resp)]
    return asyncio.run(run())


def test_every_payload_once_however_the_bytes_are_split():
    for size in (1, 3, 7, 64, len(BODY)):
        assert payloads([BODY[i:i + size] for i in range(0, len(BODY), size)]) == EVENTS


def test_crlf_lines_and_a_last_line_without_newline():
    body = BODY.replace(b"\n", b"\r\n").replace(b"data: [DONE]\r\n\r\n", b"") + b'data: {"last": 1}'
    assert payloads([body]) == EVENTS + [{"last": 1}]


def test_stream_timed_counts_text_events_and_usage():
    async def run():
        async with client_over([BODY[i:i + 5] for i in range(0, len(BODY), 5)]) as client:
            return await stream_timed(client, "/completions", {}, lambda choice: choice["text"])
    r = asyncio.run(run())
    assert (r["text"], r["num_tokens"], r["prompt_tokens"], len(r["arrivals"])) == ("Hello world", 4, 3, 4)


def served(responses):
    """An asyncio HTTP server answering each request on a connection with the next of `responses`
    (lists of byte pieces, written one by one); -> (host, port, server, requests seen)."""
    seen = []

    async def handle(reader, writer):
        while responses:
            head = await reader.readuntil(b"\r\n\r\n")
            size = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
            seen.append((head, json.loads(await reader.readexactly(size))))
            for piece in responses.pop(0):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0)
        writer.close()

    async def start():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return "127.0.0.1", server.sockets[0].getsockname()[1], server, seen
    return start()


def chunked(body: bytes, size: int, extra_headers: bytes = b"") -> list:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-request-id: r1\r\n" + extra_headers + \
        b"transfer-encoding: chunked\r\n\r\n"
    framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 9]), body[i:i + 9]) for i in range(0, len(body), 9))
    wire = head + framed + b"0\r\n\r\n"
    return [wire[i:i + size] for i in range(0, len(wire), size)]


def test_raw_streams_read_chunked_sse_split_anywhere_and_reuse_the_connection():
    from cluster.bench.raw_stream import RawStreams

    async def run():
        host, port, server, seen = await served([chunked(BODY, 1), chunked(BODY, 13), chunked(BODY, 4096)])
        streams, got = RawStreams(host, port, "Bearer k"), []
        for _ in range(3):
            payloads = []
            status, headers, _ = await streams.post("/v1/completions", {"n": 1}, payloads.append)
            got.append((status, headers["x-request-id"], [json.loads(p) for p in payloads]))
        streams.close()
        server.close()
        return got, seen
    got, seen = asyncio.run(run())
    assert got == [(200, "r1", EVENTS)] * 3
    assert len(seen) == 3 and all(b"Authorization: Bearer k" in h and body == {"n": 1} for h, body in seen)


def test_raw_streams_return_an_error_body_and_drop_a_closed_connection():
    from cluster.bench.raw_stream import RawStreams
    answer = b'{"error": "no"}'
    refused = [b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(answer), answer)]

    async def run():
        host, port, server, _ = await served([refused])
        streams = RawStreams(host, port)
        out = await streams.post("/v1/completions", {}, lambda d: None)
        server.close()
        return out, streams._idle
    (status, _, body), idle = asyncio.run(run())
    assert (status, body, idle) == (400, answer, [])


def test_stream_timed_over_raw_streams_for_http_urls():
    async def run():
        host, port, server, _ = await served([chunked(BODY, 5)])
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}/v1") as client:
            r = await stream_timed(client, "/completions", {}, lambda choice: choice["text"])
        server.close()
        return r
    r = asyncio.run(run())
    assert (r["text"], r["num_tokens"], len(r["arrivals"]), r["request_id"]) == ("Hello world", 4, 4, "r1")


def test_raw_streams_send_again_once_when_a_kept_alive_connection_was_closed_before_answering():
    from cluster.bench.raw_stream import RawStreams

    async def run():
        host, port, server, seen = await served([chunked(BODY, 64), chunked(BODY, 64)])
        streams = RawStreams(host, port)
        await streams.post("/v1/completions", {"i": 0}, lambda d: None)
        stale = streams._idle[0]
        stale.is_closed = False                 # the server's close not seen yet: it is reused
        stale.transport.close()
        payloads = []
        status, _, _ = await streams.post("/v1/completions", {"i": 1}, payloads.append)
        streams.close()
        server.close()
        return status, [json.loads(p) for p in payloads], seen
    status, got, seen = asyncio.run(run())
    assert (status, got) == (200, EVENTS)
    assert [body for _, body in seen] == [{"i": 0}, {"i": 1}]
