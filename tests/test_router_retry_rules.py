"""Retry rules at the router: a request that failed deterministically on a worker is not
sent to another one; a request on a worker that died is (scripted workers, real router)."""
from __future__ import annotations

import threading

import pytest

from cluster.wire import protocol
from tests.router_harness import COMPLETION, MODEL, assert_error, echo_reply, generates, pd_pair, wait_for


# the tokenizer loads before the first request: its few seconds must not count against
# the HTTP client's timeout on a busy machine
pytestmark = pytest.mark.usefixtures("tokenizers")


def test_poison_request_fails_once_and_is_not_redispatched(make_router):
    r = make_router(router={"policy": "round_robin"})

    def poisoned(worker, gen):
        worker.client.send(protocol.Error(rid=gen.rid, worker_id=worker.worker_id,
                                          reason="batch [7] failed: RuntimeError: bad"))
    p0, d0 = pd_pair(r, poisoned, suffix="0")
    p1, d1 = pd_pair(r, poisoned, suffix="1")
    resp = r.http.post("/v1/completions", json=COMPLETION)
    err = assert_error(resp, 500, "RuntimeError: bad")
    assert "gave up" not in err["message"]
    sent = generates(p0) + generates(p1)
    assert len(sent) == 1                               # one attempt, one prefill worker
    assert not r.dispatcher.requests


def test_killed_workers_request_is_redispatched(make_router):
    r = make_router()
    tok = r.service.tokenizer_for(MODEL)
    ids = tok.encode(" ok")
    p0, d0 = pd_pair(r, lambda w, g: None, suffix="0")       # takes it, never answers
    got = {}
    t = threading.Thread(target=lambda: got.update(resp=r.http.post("/v1/completions",
                                                                    json=COMPLETION)))
    t.start()
    assert wait_for(lambda: generates(d0))
    p1, d1 = pd_pair(r, echo_reply(ids), suffix="1")
    r.http.post("/internal/workers/decode-0/exit", json={"reason": "killed by signal 9"})
    t.join(10)
    assert got["resp"].status_code == 200, got["resp"].text
    assert got["resp"].json()["choices"][0]["text"] == " ok"
    assert len(generates(d1)) == 1 and len(generates(d0)) == 1


def test_timed_out_attempt_is_retried_on_another_pair(make_router):
    r = make_router(router={"policy": "round_robin"})
    ids = r.service.tokenizer_for(MODEL).encode(" ok")

    def timed_out(worker, gen):
        worker.client.send(protocol.Error(rid=gen.rid, worker_id=worker.worker_id, retriable=True,
                                          reason="no kv_ack from decode-0 within 20s"))
    p0, d0 = pd_pair(r, suffix="0")
    p0.reply = timed_out
    p1, d1 = pd_pair(r, echo_reply(ids), suffix="1")
    resp = r.http.post("/v1/completions", json=COMPLETION)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == " ok"
    assert len(generates(p0)) == 1 and len(generates(p1)) == 1
