"""Streaming at the router: one SSE event per token when the client keeps up, what arrived
together in one write, a backlog as one delta, and no stream that ends without [DONE] or an
error event (scripted workers, real router)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from cluster.wire import protocol
from tests.router_harness import MODEL, stream_endings, wait_for

pytestmark = pytest.mark.usefixtures("tokenizers")
WORDS = " one two three four five six seven eight"


def paced_reply(ids: list[int], together: int, every_s: float):
    """A worker that sends `together` one-token messages back to back every `every_s` (as a
    worker whose socket thread got the GIL late would), from its own thread. The first and
    last token travel as items, the steady ones between packed (`PlainTokens`), as a real
    worker sends them."""
    def reply(worker, gen):
        def run():
            for i, t in enumerate(ids):
                if worker._stop.is_set() or any(isinstance(m, protocol.Abort) for m in worker.received):
                    return
                if 0 < i < len(ids) - 1:
                    worker.plain_tokens([gen.rid], [t])
                else:
                    worker.tokens(gen.rid, [t], "length" if i == len(ids) - 1 else None)
                if (i + 1) % together == 0:
                    time.sleep(every_s)
        threading.Thread(target=run, daemon=True).start()
    return reply


def stream_texts(r, body: dict) -> tuple[list[str], str]:
    """(text of each content event, how the stream ended)."""
    texts, ended = [], "cut"
    with r.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                ended = "done"
                break
            chunk = json.loads(data)
            if "error" in chunk:
                ended = "error"
                break
            if chunk["choices"][0]["text"]:
                texts.append(chunk["choices"][0]["text"])
    return texts, ended


@pytest.mark.parametrize("together", [1, 2])
def test_stream_sends_one_event_per_token_when_the_client_keeps_up(make_router, together):
    r = make_router()
    tok = r.service.tokenizer_for(MODEL)
    ids = tok.encode(WORDS)
    pieces = [tok.decode([t]) for t in ids]
    assert "".join(pieces) == WORDS                    # one word per token: events can be counted
    r.worker("unified-0", "unified", MODEL, reply=paced_reply(ids, together, 0.04))
    assert wait_for(lambda: r.dispatcher.directory.count("unified") == 1)
    texts, ended = stream_texts(r, {"model": MODEL, "prompt": "Count:", "max_tokens": len(ids)})
    assert ended == "done"
    assert texts == pieces                              # one event per token, in order


def test_a_first_token_written_on_the_steady_path_is_counted_as_ttft(make_router):
    """A plain first token that arrives once the stream waits is written from the step's
    hand-off (no coroutine woken): still one event, one TTFT sample, ITL for the rest."""
    from tests.test_router_api import metric_values
    r = make_router()
    ids = r.service.tokenizer_for(MODEL).encode(WORDS)

    def reply(worker, gen):
        def run():
            time.sleep(0.3)                             # the response has started and waits
            for t in ids[:-1]:
                worker.plain_tokens([gen.rid], [t])
            worker.tokens(gen.rid, [ids[-1]], "length")
        threading.Thread(target=run, daemon=True).start()
    r.worker("unified-0", "unified", MODEL, reply=reply)
    assert wait_for(lambda: r.dispatcher.directory.count("unified") == 1)
    texts, ended = stream_texts(r, {"model": MODEL, "prompt": "Count:", "max_tokens": len(ids)})
    assert ended == "done" and len(texts) == len(ids)
    values = metric_values(r.http.get("/metrics").text)
    assert values[("pdcluster:time_to_first_token_seconds_count", ())] == 1
    assert values[("pdcluster:inter_token_latency_seconds_count", ())] == len(ids) - 1


def raw_stream(url: str, body: dict, http_version: str) -> tuple[bytes, bytes]:
    """(head, body bytes as sent) of one streamed completion over a raw socket."""
    import socket
    from urllib.parse import urlparse
    u = urlparse(url)
    payload = json.dumps({**body, "stream": True}).encode()
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/{http_version}\r\nHost: {u.netloc}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + payload)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    return head, rest


def dechunked(body: bytes) -> list[bytes]:
    """The chunks of an HTTP/1.1 chunked body (the last, empty one included)."""
    chunks = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        chunks.append(body[:size])
        assert body[size:size + 2] == b"\r\n"
        body = body[size + 2:]
        if size == 0:
            return chunks


def event_texts(events: bytes) -> list[str]:
    return [json.loads(e[len(b"data: "):])["choices"][0]["text"]
            for e in events.split(b"\n\n") if e.startswith(b"data: {")]


def test_steady_tokens_go_straight_to_the_socket_framed_as_the_server_frames_them(make_router, monkeypatch):
    """Once a stream is under way its plain tokens are written to the client's socket from the
    step's hand-off (no coroutine woken): each is one well-framed chunk holding one event,
    and an HTTP/1.0 client (no chunked encoding) gets the same events unframed."""
    from cluster.router import mailbox
    r = make_router()
    tok = r.service.tokenizer_for(MODEL)
    ids = tok.encode(WORDS)
    pieces = [tok.decode([t]) for t in ids]
    r.worker("unified-0", "unified", MODEL, reply=paced_reply(ids, 1, 0.03))
    assert wait_for(lambda: r.dispatcher.directory.count("unified") == 1)
    plain, queued = [], []                   # written from the hand-off = plain - queued
    real_put, real_queue = mailbox.put_tokens, mailbox.Mailbox.queue_token
    monkeypatch.setattr(mailbox, "put_tokens", lambda rows: (plain.extend(rows), real_put(rows)))
    monkeypatch.setattr(mailbox.Mailbox, "queue_token", lambda box, t: (queued.append(t), real_queue(box, t)))
    written = lambda: len(plain) - len(queued)  # noqa: E731
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": len(ids)}
    head, raw = raw_stream(r.url, body, "1.1")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks = dechunked(raw)
    texts = [t for c in chunks for t in event_texts(c)]
    assert texts == pieces and chunks[-2] == b"data: [DONE]\n\n" and chunks[-1] == b""
    assert all(len(event_texts(c)) <= 1 for c in chunks)           # one event per chunk
    assert written() >= len(ids) - 3                                  # all but the first and last
    plain.clear(), queued.clear()
    head, raw = raw_stream(r.url, body, "1.0")
    assert b"chunked" not in head.lower() and event_texts(raw) == pieces and raw.endswith(b"data: [DONE]\n\n")
    assert plain and written() == 0                                   # no wire under HTTP/1.0


def test_steady_tokens_hold_back_a_possible_stop_string_as_events_do(tokenizers):
    """The steady path (`add_token`) releases the same text at the same tokens as the event
    path (`add`), holding back what could start a stop string, and the finish trims it."""
    import random
    from cluster.engine.tokenizer import IncrementalDetokenizer
    from cluster.router.completion import CompletionText
    tok = tokenizers[""]
    ids = tok.encode("one two ST STOP three café 日本語 🎉 STOP")
    rng = random.Random(0)
    for stop in ([], ["STOP"], ["STOP", "日本"], ["x"]):
        for _ in range(5):
            steady, events = (CompletionText(IncrementalDetokenizer(tok), stop) for _ in range(2))
            cut = rng.randrange(1, len(ids) + 1)
            for t in ids[:cut - 1]:
                got = events.add([t], None, None).text
                as_event = rng.random() < 0.3          # both paths feed one stream
                assert (steady.add([t], None, None).text if as_event else steady.add_token(t)) == got
            tail = ids[cut - 1:cut]
            assert steady.add(tail, None, "stop").text == events.add(tail, None, "stop").text
            assert steady.detokenizer.ids == ids[:cut] and steady.num_tokens == cut
    stop_at = next(i for i in range(len(ids)) if "STOP" in tok.decode(ids[:i + 1]))
    text = CompletionText(IncrementalDetokenizer(tok), ["STOP"])
    sent = "".join(text.add_token(t) for t in ids[:stop_at]) + text.add(ids[stop_at:stop_at + 1], None, "stop").text
    assert sent == "one two ST "


def _generation(svc, tok):
    from cluster.engine.tokenizer import IncrementalDetokenizer
    from cluster.router.completion import CompletionText
    from cluster.router.mailbox import Mailbox
    from cluster.router.openai_response import ResponseWriter
    from cluster.router.request_state import RequestState
    from cluster.router.service import Generation
    from cluster.sampling_params import SamplingParams
    mailbox = Mailbox(asyncio.get_running_loop())
    st = RequestState("r", MODEL, "pd", [1], SamplingParams(max_tokens=64), sink=mailbox)
    st.trace = svc.tracing.begin("r", MODEL, "pd", time.monotonic())
    return Generation(st, mailbox, CompletionText(IncrementalDetokenizer(tok), []),
                      ResponseWriter("completion", "r", MODEL, tok, False, 0, False), 1, time.monotonic())


def test_events_that_arrived_together_leave_in_one_batch_and_a_backlog_as_one_delta(router):
    """Events already waiting when the stream looks leave together (one write), still one delta
    each; more than MAX_EVENTS_BEHIND waiting (a client or loop slower than the stream) leave as
    one delta; an error behind tokens still ends the stream after them."""
    from cluster.router.request_state import FailedEvent, TokensEvent
    from cluster.router.service import MAX_EVENTS_BEHIND
    svc = router.service
    tok = svc.tokenizer_for(MODEL)
    ids = tok.encode(WORDS)

    async def drain(events):
        gen = _generation(svc, tok)
        for ev in events:
            gen.mailbox.put(ev)
        out = []
        try:
            async for batch in svc.deltas(gen):
                out.append(batch)
        except Exception as e:
            out.append(e)
        return out

    singles = [TokensEvent([t], None, None) for t in ids[:-1]] + [TokensEvent([ids[-1]], None, "stop")]
    assert len(singles) <= MAX_EVENTS_BEHIND
    [batch] = asyncio.run(drain(singles))
    assert [d.token_ids for d in batch] == [[t] for t in ids]
    assert "".join(d.text for d in batch) == WORDS and batch[-1].finish_reason == "stop"
    backlog = [TokensEvent([ids[i % len(ids)]], None, None) for i in range(MAX_EVENTS_BEHIND + 1)]
    [[merged]] = asyncio.run(drain(backlog + [TokensEvent([ids[0]], None, "length")]))
    assert len(merged.token_ids) == MAX_EVENTS_BEHIND + 2 and merged.finish_reason == "length"
    failed = asyncio.run(drain(singles[:2] + [FailedEvent(500, "boom")]))
    assert [d.token_ids for d in failed[0]] == [[ids[0]], [ids[1]]] and "boom" in str(failed[-1].message)


def test_an_unexpected_failure_mid_stream_ends_with_an_error_event_not_a_cut(make_router, monkeypatch):
    """A bug while streaming (here: the detokenizer raising) must reach the client as an error
    event; an exception escaping the response would make the server drop the connection."""
    from cluster.engine.tokenizer import IncrementalDetokenizer
    r = make_router()
    tok = r.service.tokenizer_for(MODEL)
    ids = tok.encode(WORDS)
    r.worker("unified-0", "unified", MODEL, reply=paced_reply(ids, 1, 0.01))
    assert wait_for(lambda: r.dispatcher.directory.count("unified") == 1)
    real_add, real_add_one = IncrementalDetokenizer.add, IncrementalDetokenizer.add_one

    def failing(real):
        def add(self, token_ids):
            if len(self.ids) >= 3:
                raise KeyError("boom")
            return real(self, token_ids)
        return add
    monkeypatch.setattr(IncrementalDetokenizer, "add", failing(real_add))
    monkeypatch.setattr(IncrementalDetokenizer, "add_one", failing(real_add_one))
    texts, ended = stream_texts(r, {"model": MODEL, "prompt": "Count:", "max_tokens": len(ids)})
    assert ended == "error" and texts == [tok.decode([t]) for t in ids[:3]]
    assert wait_for(lambda: not r.dispatcher.requests)  # and the request was aborted


def test_a_stream_whose_client_goes_away_is_aborted_on_its_worker(make_router):
    """A client that closes mid-stream (tokens still coming, its coroutine waiting) cancels the
    stream and the request is aborted on the worker."""
    r = make_router()
    tok = r.service.tokenizer_for(MODEL)
    ids = tok.encode(WORDS) * 20
    worker = r.worker("unified-0", "unified", MODEL, reply=paced_reply(ids, 1, 0.02))
    assert wait_for(lambda: r.dispatcher.directory.count("unified") == 1)
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": len(ids), "stream": True}
    with r.http.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert sum(1 for _, line in zip(range(12), lines) if line.startswith("data: ")) >= 5
    assert wait_for(lambda: any(isinstance(m, protocol.Abort) for m in worker.received), timeout=10)
    assert wait_for(lambda: not r.dispatcher.requests)


def test_burst_of_streams_all_end_with_done(make_router):
    """128 streams at once through one router: every one ends with [DONE]."""
    r = make_router()
    tok = r.service.tokenizer_for(MODEL)
    ids = tok.encode(WORDS)
    r.worker("unified-0", "unified", MODEL, reply=paced_reply(ids, 1, 0.02))
    assert wait_for(lambda: r.dispatcher.directory.count("unified") == 1)
    ends = stream_endings(r.url, {"model": MODEL, "prompt": "Count:", "max_tokens": len(ids)}, 128)
    assert ends.count("done") == 128, {e: ends.count(e) for e in set(ends)}


def test_an_idle_connection_stays_open_longer_than_clients_keep_theirs(router):
    """Clients (httpx, the openai SDK) drop a pooled connection after 5 s idle; a server that
    closed at the same moment would reset the request a client was just sending on it."""
    import http.client
    from urllib.parse import urlparse
    url = urlparse(router.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().read()
    sock = conn.sock
    time.sleep(6)                                      # past httpx's keepalive_expiry (5 s)
    conn.request("GET", "/v1/models")
    resp = conn.getresponse()
    assert resp.status == 200 and conn.sock is sock    # the same connection answered
    conn.close()


def test_metrics_export_the_router_processes_cpu_time(router):
    """`router_cpu_seconds_total` grows with the router's work: its rate over tokens delivered
    is the host cost of streaming that benchmarks/router_stream.py measures from outside."""
    import re

    def cpu() -> float:
        text = router.http.get("/metrics").text
        return float(re.search(r'^pdcluster:router_cpu_seconds_total\{process="router"\} (\S+)$', text, re.M).group(1))
    before = cpu()
    for _ in range(20):
        router.http.get("/v1/models")
    assert 0 < before < cpu()
