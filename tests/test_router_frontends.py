"""The router's front-end path (`[router] api_servers` > 1) in one process: HTTP served by a
front end's RouterService over a DispatcherLink, the dispatcher's FrontendHub behind it,
scripted workers. The API behaves as with one process: the tests below are the single-process
router's own, run through the front end, plus aborts and request phases."""
from __future__ import annotations

from cluster.wire import protocol
from tests.router_harness import COMPLETION, MODEL, echo_reply, pd_pair, sse_events, wait_for
from tests.test_router_api import (  # noqa: F401 (collected here, through a front end)
    test_api_key_required_when_configured, test_chat_logprobs_are_returned,
    test_chat_stream_worker_error_sends_one_error_event_without_done, test_dead_decode_resumes_on_another_pair_with_sent_tokens,
    test_launcher_exit_notice_fails_over_at_once_and_internal_endpoints_are_guarded,
    test_metrics_text_parses_and_exports_worker_gauges, test_over_max_queued_requests_is_503_with_retry_after)
from tests.test_router_role_switch import test_admin_api_asks_for_the_key_and_refuses_bad_switches  # noqa: F401
from tests.test_router_streaming import test_stream_sends_one_event_per_token_when_the_client_keeps_up  # noqa: F401


ROUTER_FRONTEND = True     # conftest.make_router: every router of this module serves through a front end


def test_a_client_that_goes_away_aborts_its_request_on_the_workers(router):
    prefill, decode = pd_pair(router)                  # workers that never answer
    with router.http.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as resp:
        assert resp.headers["x-pdcluster-frontend"] == "frontend-0"
        assert wait_for(lambda: router.dispatcher.num_in_flight == 1)
    assert wait_for(lambda: any(isinstance(m, protocol.Abort) for m in decode.received), timeout=10)
    assert wait_for(lambda: router.dispatcher.num_in_flight == 0 and router.link.num_in_flight == 0)


def test_request_phases_reach_debug_through_the_front_end(router):
    tok = router.service.tokenizer_for(MODEL)
    pd_pair(router, echo_reply(tok.encode(" one two")))
    resp = router.http.post("/v1/completions", json={**COMPLETION, "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == " one two"
    rid = resp.headers["x-request-id"]
    assert wait_for(lambda: router.http.get(f"/debug/requests/{rid}").json().get("status") == "success")
    trace = router.http.get(f"/debug/requests/{rid}").json()
    assert [p["phase"] for p in trace["phases"]][0] == "router_queue" and trace["num_tokens"] == 2
    assert router.http.get("/debug/requests/nope").status_code == 404


def test_metrics_sum_the_front_ends_series_once(router):
    tok = router.service.tokenizer_for(MODEL)
    pd_pair(router, echo_reply(tok.encode(" hi")))
    assert router.http.post("/v1/completions", json=COMPLETION).status_code == 200
    page = router.http.get("/metrics").text                # the asking front end reports first
    assert 'pdcluster:requests_total{outcome="success"} 1.0' in page
    assert 'pdcluster:router_cpu_seconds_total{process="frontend-0"}' in page
    assert page.count("# TYPE pdcluster:time_to_first_token_seconds histogram") == 1
