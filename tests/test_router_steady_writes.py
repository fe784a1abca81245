"""The steady path's writes (steady_stream.put_tokens): byte for byte the events the coroutine
path's formatter builds, one chunk per token, and every token it cannot write queued in order."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from cluster.engine.tokenizer import IncrementalDetokenizer
from cluster.router.completion import CompletionText
from cluster.router.mailbox import Mailbox, _put_all
from cluster.router.metrics import RouterMetrics
from cluster.router.openai_response import ResponseWriter, sse
from cluster.router.request_state import FailedEvent, RequestState, TokensEvent
from cluster.router.service import Generation
from cluster.router.steady_stream import SteadyStream, put_tokens
from cluster.sampling_params import SamplingParams

TEXTS = ['plain words and "quotes", a \\ backslash,\ttab and\nnewline',
         "café naïve 日本語 🎉 emoji split over byte tokens",
         "</script> \u2028 \x01 control and line separators",
         "one two ST STOP three"]


class Transport:
    def __init__(self):
        self.written, self.closing = [], False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing


class Wire:
    def __init__(self):
        self.flow, self.transport = type("Flow", (), {"write_paused": False})(), Transport()


class Service:
    def __init__(self):
        self.metrics, self.aborted = RouterMetrics(lambda: 0), []
        self.dispatcher = type("D", (), {"abort": lambda _, st, reason: self.aborted.append(reason)})()


def stream(tok, loop, kind="completion", stop=(), index=0):
    """(generation, wire, service) of a stream gone steady whose coroutine waits on its mailbox."""
    mailbox = Mailbox(loop)
    st = RequestState("r", "m", "pd", [1], SamplingParams(max_tokens=1 << 10), sink=mailbox)
    writer = ResponseWriter(kind, "r", "m", tok, False, 0, True, index)
    gen = Generation(st, mailbox, CompletionText(IncrementalDetokenizer(tok), list(stop)), writer, 1,
                     time.monotonic(), index=index)
    wire, service = Wire(), Service()
    mailbox.steady = SteadyStream(service, gen, wire)
    mailbox.waiter = loop.create_future()
    return gen, wire, service


def dechunk(chunk: bytes) -> bytes:
    """One HTTP/1.1 chunk's data, its size line checked."""
    size, _, rest = chunk.partition(b"\r\n")
    assert rest.endswith(b"\r\n") and int(size, 16) == len(rest) - 2
    return rest[:-2]


@pytest.mark.parametrize("kind, stop, index", [("completion", (), 0), ("completion", ("STOP",), 0),
                                               ("chat", (), 0), ("completion", ("日本", "x"), 2),
                                               ("chat", ("STOP",), 1)])
def test_steady_events_are_byte_for_byte_the_formatters_events(tokenizers, kind, stop, index):
    """Unicode split over tokens, JSON escapes, stop strings held back, a choice index of n > 1:
    each written chunk holds exactly the event `sse(writer.chunk(...))` builds for the text the
    coroutine path's `CompletionText.add` releases at that token, and nothing when it releases
    none."""
    tok = tokenizers[""]
    loop = asyncio.new_event_loop()
    try:
        for text in TEXTS:
            gen, wire, _ = stream(tok, loop, kind, stop, index)
            reference = CompletionText(IncrementalDetokenizer(tok), list(stop))
            expected = []
            for t in tok.encode(text):
                put_tokens([(gen.mailbox, t)])
                delta = reference.add([t], None, None).text
                if delta:
                    expected.append(sse(gen.writer.chunk(delta, None)))
            assert [dechunk(c) for c in wire.transport.written] == expected
            assert not gen.mailbox.events and gen.text.num_tokens == len(tok.encode(text))
            choices = [json.loads(e[len(b"data: "):])["choices"][0] for e in expected]
            sent = "".join(c["delta"]["content"] if kind == "chat" else c["text"] for c in choices)
            assert text.startswith(sent) and all(c["index"] == index for c in choices)
    finally:
        loop.close()


def test_tokens_the_client_or_coroutine_cannot_take_now_are_queued_in_order(tokenizers):
    """A paused flow, a closing transport, a coroutine not waiting (or woken already): the token
    is queued as an event, and so is every later one until the coroutine waits again."""
    tok = tokenizers[""]
    loop = asyncio.new_event_loop()
    try:
        ids = tok.encode(" one two three four five six")
        gen, wire, _ = stream(tok, loop)
        box = gen.mailbox
        put_tokens([(box, ids[0])])
        wire.flow.write_paused = True
        put_tokens([(box, ids[1])])
        wire.flow.write_paused = False
        put_tokens([(box, ids[2])])                        # behind a queued one: queued too
        assert box.waiter.done() and [e.token_ids for e in box.events] == [[ids[1]], [ids[2]]]
        box.events, box.waiter = [], loop.create_future()
        wire.transport.closing = True
        _put_all([], [(box, ids[3])])
        assert [e.token_ids for e in box.events] == [[ids[3]]] and len(wire.transport.written) == 1
        box.events, box.waiter, wire.transport.closing = [], None, False
        put_tokens([(box, ids[4])])                        # nobody waits: queued
        assert [e.token_ids for e in box.events] == [[ids[4]]] and len(wire.transport.written) == 1
        assert all(type(e) is TokensEvent and e.is_plain for e in box.events)
    finally:
        loop.close()


def test_a_step_of_many_streams_writes_each_its_own_event_and_counts_ttft_then_itl(tokenizers):
    """One hand-off of a step: every stream gets its own chunk; a stream's first token is its
    TTFT sample, the next ones ITL samples (one clock read for the step)."""
    tok = tokenizers[""]
    loop = asyncio.new_event_loop()
    try:
        ids = tok.encode(" alpha beta gamma")
        streams = [stream(tok, loop, index=i) for i in range(3)]
        service = streams[0][2]
        for gen, _, _ in streams[1:]:
            gen.mailbox.steady.service = service           # one router's metrics
        for t in ids:
            put_tokens([(gen.mailbox, t) for gen, _, _ in streams])
        for gen, wire, _ in streams:
            assert len(wire.transport.written) == len(ids) and gen.num_output == len(ids)
            assert gen.first_token_at is not None and gen.last_token_at >= gen.first_token_at
        assert sum(service.metrics.itl.counts) == 3 * (len(ids) - 1)
    finally:
        loop.close()


def test_a_failure_on_the_steady_path_queues_an_error_then_the_token_and_aborts(tokenizers, monkeypatch):
    tok = tokenizers[""]
    loop = asyncio.new_event_loop()
    try:
        gen, wire, service = stream(tok, loop)

        def boom(self, token_id):
            raise KeyError("boom")
        monkeypatch.setattr(IncrementalDetokenizer, "add_one", boom)
        put_tokens([(gen.mailbox, 5)])
        failed, queued = gen.mailbox.events
        assert isinstance(failed, FailedEvent) and "boom" in failed.message and queued.token_ids == [5]
        assert gen.mailbox.steady is None and service.aborted == ["router failure"] and not wire.transport.written
        assert gen.mailbox.waiter.done()
    finally:
        loop.close()


@pytest.mark.parametrize("extra", [{"logprobs": 1}, {"n": 2, "seed": 3}])
def test_streams_with_logprobs_or_several_choices_never_take_the_steady_path(make_router, monkeypatch, extra):
    """Logprobs and n > 1 (interleaved choices) stay on the coroutine path: every plain token
    is queued for it, and the events carry what only that path formats (logprobs, indexes)."""
    from cluster.router import mailbox
    from tests.router_harness import MODEL, wait_for
    from tests.test_router_streaming import WORDS, dechunked, paced_reply, raw_stream
    r = make_router()
    ids = r.service.tokenizer_for(MODEL).encode(WORDS)
    r.worker("unified-0", "unified", MODEL, reply=paced_reply(ids, 1, 0.02))
    assert wait_for(lambda: r.dispatcher.directory.count("unified") == 1)
    plain, queued = [], []
    real_put, real_queue = mailbox.put_tokens, Mailbox.queue_token
    monkeypatch.setattr(mailbox, "put_tokens", lambda rows: (plain.extend(rows), real_put(rows)))
    monkeypatch.setattr(Mailbox, "queue_token", lambda box, t: (queued.append(t), real_queue(box, t)))
    _, raw = raw_stream(r.url, {"model": MODEL, "prompt": "Count:", "max_tokens": len(ids), **extra}, "1.1")
    events = [e for c in dechunked(raw) for e in c.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]" and plain and len(queued) == len(plain)
    choices = [c for e in events[:-1] for c in json.loads(e[len(b"data: "):])["choices"]]
    indexes = {c["index"] for c in choices}
    assert indexes == set(range(extra.get("n", 1)))
    for i in indexes:
        assert "".join(c["text"] for c in choices if c["index"] == i) == WORDS
    if "logprobs" in extra:
        assert all(c["logprobs"] is not None for c in choices if c["text"])
