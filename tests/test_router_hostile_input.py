"""Hostile HTTP input against a real router with scripted workers: every case is a 4xx
with the OpenAI error body, never a 5xx, never a generate sent to a worker; and a huge
body does not stall the streams already running nor get a healthy worker declared dead."""
from __future__ import annotations

import json
import threading
import time

import pytest

from tests.router_harness import CHAT, COMPLETION, MODEL, assert_error, pd_pair


# the tokenizer loads before the first request: its few seconds must not count against
# the HTTP client's timeout on a busy machine
pytestmark = pytest.mark.usefixtures("tokenizers")

NAN_CASES = [b'"temperature": NaN', b'"temperature": Infinity', b'"top_p": -Infinity',
             b'"presence_penalty": 1e999', b'"seed": ' + b"9" * 5000]


def raw_completion(extra: bytes) -> bytes:
    return b'{"model": "%s", "prompt": "Hi", "max_tokens": 2, %s}' % (MODEL.encode(), extra)


@pytest.fixture
def router(make_router):
    r = make_router(router={"max_body_bytes": 64 << 10})
    r.prefill, r.decode = pd_pair(r)
    return r


def assert_nothing_dispatched(r) -> None:
    assert not r.prefill.received and not r.decode.received


@pytest.mark.parametrize("extra", NAN_CASES)
def test_non_finite_or_oversized_numbers_are_400(router, extra):
    resp = router.http.post("/v1/completions", content=raw_completion(extra),
                            headers={"content-type": "application/json"})
    assert_error(resp, 400)
    assert_nothing_dispatched(router)


def test_deeply_nested_body_is_400(router):
    resp = router.http.post("/v1/completions", content=b"[" * 30_000 + b"]" * 30_000)
    assert_error(resp, 400)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {**COMPLETION, "prompt": [1, 2, 10**9]}),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": [49152]}),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"49152": 5}}),
    ("/v1/chat/completions", {**CHAT, "top_k": 10**6}),
    ("/v1/chat/completions", {**CHAT, "top_k": 2**64}),
    ("/v1/chat/completions", {**CHAT, "seed": 2**64}),
    ("/v1/chat/completions", {**CHAT, "repetition_penalty": 10**400}),
    ("/v1/chat/completions", {**CHAT, "stop": ["x"] * 5000}),
    ("/v1/chat/completions", {**CHAT, "stop": ["x" * 10_000]}),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2**40}),
])
def test_values_beyond_their_type_or_the_vocabulary_are_400(router, path, body):
    assert_error(router.http.post(path, json=body), 400)
    assert_nothing_dispatched(router)


def test_body_over_max_body_bytes_is_413_declared_or_streamed(router):
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * (70 << 10)}]})
    assert_error(router.http.post("/v1/chat/completions", content=big), 413)

    def chunks():                                   # no Content-Length: chunked upload
        for _ in range(80):
            yield b" " * 1024
    resp = router.http.post("/v1/chat/completions", content=chunks())
    assert_error(resp, 413)
    assert_nothing_dispatched(router)


def test_prompt_that_cannot_fit_is_refused_before_tokenizing(make_router):
    r = make_router(model={"max_model_len": 64})
    pd_pair(r)
    tokenized, prompt_ids = [], r.service._tokenize.prompt_ids

    async def counted(parsed, tokenizer):
        tokenized.append(parsed)
        return await prompt_ids(parsed, tokenizer)
    r.service._tokenize.prompt_ids = counted
    resp = r.http.post("/v1/completions", json={**COMPLETION, "prompt": "word " * 1_000_000})
    assert_error(resp, 400, "too long")
    assert tokenized == []        # the tokenizer never saw it (not "answered in < 5 s": a loaded box's clock)


def test_non_ascii_api_key_header_is_401_and_metrics_can_require_the_key(make_router):
    r = make_router(router={"api_key": "sekret", "metrics_require_key": True})
    resp = r.http.post("/v1/completions", json=COMPLETION,
                       headers={"Authorization": "Bearer s\u00e9kret".encode("latin-1")})
    assert_error(resp, 401)
    assert_error(r.http.get("/metrics"), 401)
    ok = r.http.get("/metrics", headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200 and "pdcluster:" in ok.text


def test_large_body_does_not_stall_running_streams_or_kill_workers(make_router):
    # 3 s: a stall of the kind this guards against (tokenizing 8 MiB) takes several seconds, while
    # a loaded 2-core CI machine may hold a healthy loop for most of a second
    r = make_router(timeouts={"heartbeat_interval": 0.1, "heartbeat_dead_after": 3.0})
    tok = r.service.tokenizer_for(MODEL)
    one = tok.encode(" a")

    def trickle(worker, gen):                       # one token every 20 ms, 150 tokens
        def run():
            for i in range(150):
                time.sleep(0.02)
                worker.tokens(gen.rid, one, "length" if i == 149 else None)
        threading.Thread(target=run, daemon=True).start()
    pd_pair(r, trickle)
    gaps: list[float] = []

    def stream():
        body = {**COMPLETION, "max_tokens": 150, "stream": True}
        with r.http.stream("POST", "/v1/completions", json=body, timeout=60) as resp:
            last = time.monotonic()
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
    streams = [threading.Thread(target=stream) for _ in range(3)]
    for t in streams:
        t.start()
    time.sleep(0.5)
    # just under 8 MiB of prose: admitted by size, refused by length before tokenizing
    big = {**CHAT, "messages": [{"role": "user", "content": "lorem ipsum " * 690_000}]}
    resp = r.http.post("/v1/chat/completions", json=big, timeout=60)
    assert resp.status_code == 400, resp.text
    for t in streams:
        t.join(60)
    assert len(gaps) >= 3 * 150
    assert max(gaps[1:]) < 3.0, sorted(gaps)[-5:]
    assert r.dispatcher.directory.has_pair()        # nobody was declared dead
    assert not r.dispatcher.directory.departed
