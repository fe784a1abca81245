"""`[slo]` targets: every successful request judged on the TTFT and TPOT the router measured,
attainment and goodput over a sliding window, exported on /metrics only when a target is set."""
import time

from prometheus_client.parser import text_string_to_metric_families

from cluster.config import SloConfig
from cluster.router.slo import SloWindow, request_tpot
from tests.router_harness import COMPLETION, pd_pair, wait_for


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_attainment_per_kind_and_goodput_over_the_window_forget_older_requests():
    clock = Clock()
    slo = SloWindow(SloConfig(ttft=1.0, tpot=0.05, window=10.0), clock)
    assert slo.attainment() == {}                            # no requests: no figure
    slo.observe(0.5, 0.04)                                   # meets both
    slo.observe(1.5, 0.04)                                   # late first token
    slo.observe(0.5, 0.06)                                   # slow steps
    slo.observe(0.9, None)                                   # one token: no TPOT to miss
    assert slo.attainment() == {"ttft": 0.75, "tpot": 0.75, "both": 0.5}
    assert slo.goodput() == 2 / 10.0
    clock.now += 10.5                                        # all four leave the window
    slo.observe(2.0, 0.01)
    assert slo.attainment() == {"ttft": 0.0, "tpot": 1.0, "both": 0.0}
    assert slo.goodput() == 0.0


def test_an_unset_target_is_always_met_and_tpot_is_the_mean_after_the_first_token():
    slo = SloWindow(SloConfig(ttft=0.2), Clock())
    slo.observe(0.1, 9.0)
    assert slo.attainment() == {"ttft": 1.0, "tpot": 1.0, "both": 1.0}
    assert request_tpot(1.0, 5.5, 10) == 0.5 and request_tpot(1.0, 1.0, 1) is None


def _samples(text: str, name: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[s.labels.get("kind", "")] = s.value
    return out


def test_router_exports_attainment_of_its_finished_requests(make_router):
    r = make_router(slo={"ttft": 30.0, "tpot": 1e-9})          # any real stream misses the TPOT target

    def reply(worker, gen):
        for i in range(3):
            time.sleep(0.01)
            worker.tokens(gen.rid, [42 + i], "length" if i == 2 else None)
    pd_pair(r, reply_decode=reply)
    for _ in range(2):
        assert r.http.post("/v1/completions", json={**COMPLETION, "max_tokens": 3}).status_code == 200
    assert wait_for(lambda: _samples(r.http.get("/metrics").text, "pdcluster:slo_attainment"))
    text = r.http.get("/metrics").text
    assert _samples(text, "pdcluster:slo_attainment") == {"ttft": 1.0, "tpot": 0.0, "both": 0.0}
    assert _samples(text, "pdcluster:slo_goodput") == {"": 0.0}


def test_no_slo_section_no_attainment_metrics(router):
    assert "slo_attainment" not in router.http.get("/metrics").text
