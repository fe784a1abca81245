"""Peer failures at the router (real router, scripted workers on real sockets): a dead
prefill worker leaves requests already on decode alone; a stalled worker that comes back
gets its stale attempts aborted and its late tokens are ignored; a router that restarts
is re-registered with; a drained router tells its workers to shut down."""
from __future__ import annotations

import pytest

import threading
import time

from cluster.runtime.router_link import RouterLink
from cluster.wire import protocol
from cluster.wire.transport import ControlClient, ControlServer
from tests.router_harness import COMPLETION, MODEL, echo_reply, generates, pd_pair, wait_for


# the tokenizer loads before the first request: its few seconds must not count against
# the HTTP client's timeout on a busy machine
pytestmark = pytest.mark.usefixtures("tokenizers")


def post_in_background(r, body):
    got = {}
    t = threading.Thread(target=lambda: got.update(resp=r.http.post("/v1/completions", json=body)))
    t.start()
    return t, got


def test_prefill_death_leaves_requests_already_on_decode_alone(make_router):
    r = make_router()
    ids = r.service.tokenizer_for(MODEL).encode(" one two three four")
    release = threading.Event()

    def first_then_rest(worker, gen):
        worker.tokens(gen.rid, ids[:1])
        threading.Thread(target=lambda: (release.wait(10), echo_reply(ids[1:])(worker, gen)),
                         daemon=True).start()
    p0, d0 = pd_pair(r, first_then_rest)
    t, got = post_in_background(r, {**COMPLETION, "max_tokens": len(ids)})
    assert wait_for(lambda: any(s.output_ids for s in r.dispatcher.requests.values()))
    r.http.post("/internal/workers/prefill-0/exit", json={"reason": "killed"})
    release.set()
    t.join(10)
    assert got["resp"].status_code == 200, got["resp"].text
    assert got["resp"].json()["choices"][0]["text"] == " one two three four"
    assert len(generates(d0)) == 1
    assert not [m for m in d0.received if isinstance(m, protocol.Abort)]


def test_stalled_worker_back_gets_stale_attempts_aborted_and_late_tokens_ignored(make_router):
    r = make_router(timeouts={"heartbeat_interval": 0.1, "heartbeat_dead_after": 0.6})
    ids = r.service.tokenizer_for(MODEL).encode(" alpha beta gamma")
    stalled = {}

    def stall(worker, gen):                        # like SIGSTOP: silent mid-request
        worker.tokens(gen.rid, ids[:1])
        worker.heartbeats = False
        stalled["rid"] = gen.rid
    p0, d0 = pd_pair(r, stall, suffix="0")
    t, got = post_in_background(r, {**COMPLETION, "max_tokens": len(ids)})
    assert wait_for(lambda: "rid" in stalled)
    p1, d1 = pd_pair(r, echo_reply(ids[1:]), suffix="1")
    t.join(10)
    assert got["resp"].json()["choices"][0]["text"] == " alpha beta gamma"
    d0.tokens(stalled["rid"], ids[:2], "length")   # SIGCONT: late tokens of the old attempt
    d0.heartbeats = True
    assert wait_for(lambda: r.dispatcher.directory.get("decode-0") is not None)  # serving again
    # one abort when declared dead (lost if the link was down), one again on its return
    assert wait_for(lambda: sum(isinstance(m, protocol.Abort) and m.rid == stalled["rid"]
                                for m in d0.received) == 2)
    assert not r.dispatcher.requests


def test_worker_registers_again_when_the_router_restarts_and_gives_up_when_it_is_gone():
    server = ControlServer()
    endpoint = server.endpoint
    client = ControlClient(endpoint, "prefill-0")
    register = protocol.Register(worker_id="prefill-0", role="prefill", model=MODEL,
                                 capacity={"num_pages": 8, "page_size": 16,
                                           "max_running_requests": 8, "tp": 1},
                                 kv_fingerprint={"num_layers": 2, "num_kv_heads": 1, "head_dim": 8,
                                                 "dtype": "float32", "page_size": 16, "layout": "kv"},
                                 data_addr="tcp://127.0.0.1:1", pid=1)
    lost = threading.Event()
    # 5 s: the restart below must not look like a lost router even when loaded cores slow the reconnect
    link = RouterLink(client, register, lost_after=5.0, on_lost=lost.set).start()
    try:
        client.send(register)
        assert server.recv(5) == ("prefill-0", register)
        server.close()
        time.sleep(0.3)
        server = ControlServer(endpoint)                     # the router restarted
        assert server.recv(5) == ("prefill-0", register)      # registered again unasked
        assert not lost.is_set()
        server.close()
        assert lost.wait(30) and link.is_lost                # nobody there: give up
    finally:
        link.stop()
        client.close()
        server.close()


def test_drained_router_tells_its_workers_to_shut_down(make_router):
    r = make_router()
    p0, d0 = pd_pair(r)
    r.dispatcher.shutdown_workers("router shutting down")
    assert wait_for(lambda: any(isinstance(m, protocol.Shutdown) for m in d0.received))
    assert any(isinstance(m, protocol.Shutdown) for m in p0.received)


def test_prefill_death_after_the_kv_landed_on_a_dllm_worker_leaves_the_request_there(make_router):
    """A DLLM worker streams nothing until its first block is done: the `kv_received` mark,
    not a token, says the prompt was handed over."""
    from cluster.config import WorkerGroup
    dllm_model = f"{MODEL}-dllm"
    r = make_router(groups=(WorkerGroup("prefill"), WorkerGroup("dllm", model=dllm_model, prefill="remote")))
    release = threading.Event()

    def land_then_answer(worker, gen):
        worker.client.send(protocol.RequestMarks(worker_id=worker.worker_id, items=[protocol.MarksItem(
            gen.rid, [protocol.RequestMark("kv_received", time.time(), {})])]))
        threading.Thread(target=lambda: (release.wait(10), worker.tokens(gen.rid, [7, 8], "length")),
                         daemon=True).start()
    r.worker("prefill-0", "prefill", MODEL)
    dllm = r.worker("dllm-0", "dllm", dllm_model, reply=land_then_answer)
    assert wait_for(lambda: r.dispatcher.directory.count("prefill") and r.dispatcher.directory.count("dllm"))
    t, got = post_in_background(r, {**COMPLETION, "model": dllm_model, "max_tokens": 2})
    assert wait_for(lambda: any(s.trace and "kv_received" in s.trace.marks for s in r.dispatcher.requests.values()))
    r.http.post("/internal/workers/prefill-0/exit", json={"reason": "killed"})
    release.set()
    t.join(10)
    assert got["resp"].status_code == 200, got["resp"].text
    assert generates(dllm)[0].peer.worker_id == "prefill-0"   # it was placed on the pair
    assert len(generates(dllm)) == 1                     # and never moved
    assert not [m for m in dllm.received if isinstance(m, protocol.Abort)]
