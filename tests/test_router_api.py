"""Router HTTP API against a real router (uvicorn on a free loopback port) and scripted
workers speaking the real protocol through ControlClient sockets: validation and error
bodies, auth, health, metrics text, admission limits, dispatch, streaming, failover."""
from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from cluster.wire import protocol
from tests.router_harness import (CHAT, COMPLETION, MODEL, RunningRouter, assert_error, echo_reply, pd_pair,
                                  sse_events, wait_for)


# ----------------------------------------------------------------------- validation: 400s

def test_bad_json_is_400_with_error_body(router):
    resp = router.http.post("/v1/completions", content=b"{not json",
                            headers={"content-type": "application/json"})
    assert_error(resp, 400, "not valid JSON")


@pytest.mark.parametrize("path,patch,field", [
    ("/v1/completions", {"temperature": "hot"}, "temperature"),
    ("/v1/completions", {"top_p": 0}, "top_p"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": None}, "prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt[1]"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
    ("/v1/completions", {"regex": "([a-"}, "regex"),
    ("/v1/completions", {"regex": "a+", "ebnf": 'root ::= "a"'}, "ebnf"),
    ("/v1/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
     "response_format"),
    ("/v1/completions", {"stop": [1]}, "stop"),
    ("/v1/completions", {"stream": "yes"}, "stream"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools[0]"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"min_tokens": 9}, "min_tokens"),
])
def test_bad_field_is_400_naming_the_field(router, path, patch, field):
    body = {**(CHAT if "chat" in path else COMPLETION), **patch}
    assert_error(router.http.post(path, json=body), 400, field)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_n_above_the_limit_is_400(router, path):
    body = {**(CHAT if "chat" in path else COMPLETION), "n": 17}
    assert_error(router.http.post(path, json=body), 400, "n:")


def test_prompt_longer_than_max_model_len_is_400(make_router):
    r = make_router(model={"max_model_len": 64})
    pd_pair(r)
    long_prompt = "hello " * 100
    assert_error(r.http.post("/v1/completions", json={**COMPLETION, "prompt": long_prompt}),
                 400, "maximum context length")
    resp = r.http.post("/v1/completions", json={**COMPLETION, "prompt": "hi", "max_tokens": 64})
    assert_error(resp, 400, "max_tokens")


def test_dllm_fields_validated_and_only_for_dllm_models(router):
    assert_error(router.http.post("/v1/completions", json={**COMPLETION, "block_size": 4}),
                 400, "dllm")
    assert_error(router.http.post("/v1/completions", json={**COMPLETION, "block_size": 65}),
                 400, "block_size")
    assert_error(router.http.post("/v1/completions", json={**COMPLETION, "algorithm": "x"}),
                 400, "algorithm")


def test_unknown_model_is_404(router):
    err = assert_error(router.http.post("/v1/completions", json={**COMPLETION, "model": "gpt-9"}),
                       404, "gpt-9")
    assert err["code"] == "model_not_found"


def test_unknown_route_has_error_body(router):
    assert_error(router.http.get("/v1/nothing"), 404)


def test_api_key_required_when_configured(make_router):
    r = make_router(router={"api_key": "sekrit"})
    assert_error(r.http.get("/v1/models"), 401, "API key")
    assert_error(r.http.post("/v1/completions", json=COMPLETION,
                             headers={"Authorization": "Bearer wrong"}), 401)
    ok = r.http.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
    assert r.http.get("/health").status_code == 503          # no workers; but no 401


# ------------------------------------------------------------------ health, models, metrics

def test_health_is_503_without_workers_and_200_with_a_pair(router):
    resp = router.http.get("/health")
    assert resp.status_code == 503 and resp.json()["status"] == "unavailable"
    router.worker("prefill-0", "prefill", MODEL)
    assert router.http.get("/health").status_code == 503     # decode missing
    router.worker("decode-0", "decode", MODEL)
    assert wait_for(lambda: router.http.get("/health").status_code == 200)


@pytest.mark.parametrize("sections", [{"slo": {"ttft": 1.0}}, {"router": {"local_prefill_max_tokens": 64}}],
                         ids=["decode_side_prefill", "local_prefill"])
def test_health_is_degraded_not_503_when_decode_workers_prefill_themselves(make_router, sections):
    r = make_router(**sections)
    assert r.http.get("/health").status_code == 503          # nothing serves
    r.worker("decode-0", "decode", MODEL)
    assert wait_for(lambda: r.http.get("/health").json()["status"] == "degraded")
    assert r.http.get("/health").status_code == 200
    r.worker("prefill-0", "prefill", MODEL)
    assert wait_for(lambda: r.http.get("/health").json()["status"] == "ok")


def test_no_workers_is_503_with_retry_after(router):
    resp = router.http.post("/v1/completions", json=COMPLETION)
    assert_error(resp, 503, "no live worker")
    assert resp.headers["retry-after"]


def test_models_lists_main_and_dllm_models(make_router):
    from cluster.config import WorkerGroup
    r = make_router(groups=(WorkerGroup("unified"), WorkerGroup("dllm", model="tiny-dllm")))
    ids = [m["id"] for m in r.http.get("/v1/models").json()["data"]]
    assert ids == [MODEL, "tiny-dllm"]


METRIC_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? '
                         r'(-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')


def test_metrics_text_parses_and_exports_worker_gauges(router):
    seconds = protocol.HistogramSample("kv_transfer_seconds", [0.1, 1.0], [1, 2, 0], 0.5, 3)
    gauges = protocol.WorkerGauges(num_running_reqs=2, num_queue_reqs=1, token_usage=0.25,
                                   kv_transfer_bytes_total=4096, protocol_errors_total=0,
                                   kv_transfer_seconds=seconds)
    router.worker("decode-0", "decode", MODEL, gauges=gauges)
    assert wait_for(lambda: router.dispatcher.worker_stats()
                    and router.dispatcher.worker_stats()[0][2] == gauges)
    resp = router.http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    lines = resp.text.strip().split("\n")
    for line in lines:
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or \
            METRIC_LINE.match(line), line
    text = resp.text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "kv_transfer_seconds", "request_phase_seconds"):
        assert f"# TYPE pdcluster:{name} histogram" in text
    assert "# TYPE pdcluster:kv_transfer_bytes_total counter" in text
    values = metric_values(text)
    assert values[("pdcluster:requests_total", (("outcome", "success"),))] == 0
    decode = (("role", "decode"), ("worker", "decode-0"))
    assert values[("pdcluster:num_running_reqs", decode)] == 2
    assert values[("pdcluster:token_usage", decode)] == 0.25
    assert values[("pdcluster:kv_transfer_seconds_bucket", (("le", "0.1"),) + decode)] == 1
    assert values[("pdcluster:kv_transfer_seconds_bucket", (("le", "+Inf"),) + decode)] == 3
    assert values[("pdcluster:kv_transfer_seconds_count", decode)] == 3
    assert values[("pdcluster:worker_restarts_total", decode)] == 0


def test_inter_token_latency_histogram_exports_what_prometheus_histogram_does():
    """The ITL histogram is observed per streamed token by a cheaper class: its exposition is
    byte-identical to prometheus_client's Histogram fed the same values (edges included)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from cluster.router.metrics import ITL_BUCKETS, LoopHistogram
    ours, theirs = CollectorRegistry(auto_describe=False), CollectorRegistry(auto_describe=False)
    loop = LoopHistogram("pdcluster:itl_seconds", "doc", ITL_BUCKETS, ours)
    reference = Histogram("pdcluster:itl_seconds", "doc", buckets=ITL_BUCKETS, registry=theirs)
    for v in [0.0, 0.005, 0.0050001, 0.02, 0.019999, 2.5, 3.0, 1e9] + [i / 997 for i in range(300)]:
        loop.observe(v)
        reference.observe(v)
    assert generate_latest(ours) == generate_latest(theirs)


def metric_values(text: str) -> dict:
    """{(sample name, sorted labels): value} parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ----------------------------------------------------------- dispatch through real sockets

def test_over_max_queued_requests_is_503_with_retry_after(make_router):
    r = make_router(router={"max_queued_requests": 1})
    pd_pair(r)                                          # workers that never answer
    def hold_one():
        with httpx.Client(base_url=r.url, timeout=30) as client:
            try:
                client.post("/v1/completions", json=COMPLETION)
            except httpx.HTTPError:
                pass                                    # the router closes at teardown
    threading.Thread(target=hold_one, daemon=True).start()
    assert wait_for(lambda: r.dispatcher.num_in_flight == 1)
    resp = r.http.post("/v1/completions", json=COMPLETION)
    assert_error(resp, 503, "max_queued_requests")
    assert resp.headers["retry-after"] == "1"


def test_generate_goes_to_both_sides_of_a_pair_with_peers(router, tokenizers):
    tok = router.service.tokenizer_for(MODEL)
    ids = tok.encode(" world, and more")
    prefill, decode = pd_pair(router, echo_reply(ids))
    resp = router.http.post("/v1/completions", json=COMPLETION)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["text"] == " world, and more"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == len(ids)
    assert wait_for(lambda: prefill.received and decode.received)   # the prefill side reads it on its own thread
    gp, gd = prefill.received[0], decode.received[0]
    assert gp.rid == gd.rid and gp.input_ids == gd.input_ids == tok.encode("Hello")
    assert gp.peer.worker_id == "decode-0" and gd.peer.worker_id == "prefill-0"
    assert gp.sampling.max_tokens == 8


def test_stream_trims_stop_string_and_ends_with_done(router):
    tok = router.service.tokenizer_for(MODEL)
    ids = tok.encode("one two STOP three")
    stop_at = next(i for i in range(len(ids)) if "STOP" in tok.decode(ids[:i + 1]))
    pd_pair(router, echo_reply(ids[:stop_at + 1], finish="stop"))
    body = {**COMPLETION, "stream": True, "stop": ["STOP"],
            "stream_options": {"include_usage": True}}
    with router.http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == "one two "
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == stop_at + 1


def test_chat_stream_worker_error_sends_one_error_event_without_done(router):
    def fail(worker, gen):
        worker.tokens(gen.rid, [42])
        worker.client.send(protocol.Error(rid=gen.rid, reason="boom", worker_id=worker.worker_id))
    pd_pair(router, fail)
    with router.http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        events = sse_events(resp)
    assert "[DONE]" not in events
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "boom" in events[-1]["error"]["message"]


def test_chat_logprobs_are_returned(router):
    tok = router.service.tokenizer_for(MODEL)
    pd_pair(router, echo_reply(tok.encode("Hi there")))
    resp = router.http.post("/v1/chat/completions", json={**CHAT, "logprobs": True})
    choice = resp.json()["choices"][0]
    assert choice["message"]["content"] == "Hi there"
    assert [c["logprob"] for c in choice["logprobs"]["content"]] == [-0.5] * 2


def test_dead_decode_resumes_on_another_pair_with_sent_tokens(make_router):
    r = make_router()
    tok = r.service.tokenizer_for(MODEL)
    ids = tok.encode(" alpha beta gamma delta")

    def first_half(worker, gen):
        worker.tokens(gen.rid, ids[:2])
        worker.heartbeats = False                     # then goes silent
    pd_pair(r, first_half, suffix="0")
    with r.http.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True,
                                                        "max_tokens": len(ids)}) as resp:
        assert wait_for(lambda: any(s.output_ids for s in r.dispatcher.requests.values()))
        _, decode1 = pd_pair(r, echo_reply(ids[2:]), suffix="1")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == " alpha beta gamma delta"
    resumed = decode1.received[0]
    assert resumed.output_ids == ids[:2] and resumed.sampling.max_tokens == len(ids)   # the original: it counts the 2 sent


def test_launcher_exit_notice_fails_over_at_once_and_internal_endpoints_are_guarded(make_router):
    r = make_router()
    pd_pair(r)
    workers = r.http.get("/internal/workers").json()["workers"]
    assert sorted(w["worker_id"] for w in workers) == ["decode-0", "prefill-0"]
    resp = r.http.post("/internal/workers/decode-0/exit", json={"reason": "exit code -9"})
    assert resp.json()["was_registered"] is True
    assert r.http.get("/health").status_code == 503


def test_internal_endpoints_need_the_token(tokenizers):
    r = RunningRouter(tokenizers, internal_token="t0ken")
    try:
        assert_error(r.http.get("/internal/workers"), 403)
        ok = r.http.get("/internal/workers", headers={"X-PDCluster-Token": "t0ken"})
        assert ok.status_code == 200 and ok.json()["workers"] == []
    finally:
        r.close()
