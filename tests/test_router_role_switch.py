"""The router's side of a role switch, with scripted workers: the admin API sends
`role_switch`, places nothing new on the worker meanwhile, and takes its next `register`
(same process, new role) as the end of the switch, not a restart."""
from cluster.wire import protocol
from tests.router_harness import COMPLETION, echo_reply, generates, MODEL, pd_pair, register_again, wait_for


def test_switch_sends_role_switch_stops_placing_and_ends_at_the_new_register(make_router):
    r = make_router(router={"policy": "round_robin"})
    _, decode = pd_pair(r, reply_decode=echo_reply([42]))
    other = r.worker("prefill-1", "prefill", MODEL)
    assert wait_for(lambda: r.dispatcher.directory.count("prefill") == 2)
    resp = r.http.post("/admin/workers/prefill-1/role", json={"role": "decode"})
    assert resp.status_code == 202 and resp.json()["switching_to"] == "decode"
    assert wait_for(lambda: any(isinstance(m, protocol.RoleSwitch) for m in other.received))
    for _ in range(3):                                          # all to prefill-0 meanwhile
        assert r.http.post("/v1/completions", json=COMPLETION).status_code == 200
    assert generates(other) == []
    register_again(other, "decode")
    assert wait_for(lambda: r.dispatcher.directory.count("decode") == 2)
    listed = {w["worker_id"]: w for w in r.http.get("/admin/workers").json()["workers"]}
    assert listed["prefill-1"]["role"] == "decode" and listed["prefill-1"]["switching_to"] is None
    assert r.dispatcher.restarts()["prefill-1"][1] == 0          # a switch, not a restart
    assert 'pdcluster:role_switches_total{from="prefill",to="decode"} 1.0' in r.http.get("/metrics").text


def test_admin_api_asks_for_the_key_and_refuses_bad_switches(make_router):
    r = make_router(router={"api_key": "k"})
    pd_pair(r)
    assert r.http.get("/admin/workers").status_code == 401
    auth = {"Authorization": "Bearer k"}
    assert r.http.post("/admin/workers/nobody/role", json={"role": "decode"}, headers=auth).status_code == 404
    assert r.http.post("/admin/workers/decode-0/role", json={"role": "decode"}, headers=auth).status_code == 409
    resp = r.http.post("/admin/workers/decode-0/role", json={"role": "prefill"}, headers=auth)
    assert resp.status_code == 409 and "no prefill/decode pair" in resp.text
    assert r.http.post("/admin/workers/decode-0/role", json={"mode": 1}, headers=auth).status_code == 400


def test_a_tensor_parallel_worker_may_switch(make_router):
    """Its handoff maps KV heads between TP sizes, whatever role it takes."""
    r = make_router()
    pd_pair(r)
    r.worker("unified-0", "unified", MODEL, tp=2)
    assert wait_for(lambda: r.dispatcher.directory.count("unified") == 1)
    resp = r.http.post("/admin/workers/unified-0/role", json={"role": "prefill"})
    assert resp.status_code == 202 and resp.json()["switching_to"] == "prefill"
