"""Decode-side prefill under a step budget: the step cost model a decode worker fits from its own
forwards, the prompt chunk it sizes from it for the TPOT target, and the router's choice to send
a prompt there when the prefill side would break the TTFT target. The mixed steps themselves run
the real model in tests/test_handoff_inprocess.py."""
from __future__ import annotations

import math

import pytest

from cluster.router.placer import Placer, decode_side_seconds, prefill_seconds
from cluster.router.request_state import Placement, RequestState
from cluster.router.worker_directory import WorkerDirectory, WorkerInfo
from cluster.runtime.step_cost import BUDGET_SHARE, PRIOR_TOKEN_S, Coefs, RateWindow, StepCostModel
from cluster.sampling_params import SamplingParams
from cluster.wire.gauges import WorkerGauges

TRUE = Coefs(base=0.010, per_row=0.002, per_token=0.0005)


def synthetic_steps(model: StepCostModel, coefs: Coefs = TRUE) -> None:
    for rows in (1, 4, 8, 16):
        for tokens in (0, 32, 128, 512):
            model.observe(rows, tokens, coefs.seconds(rows, tokens))


def test_least_squares_recovers_the_step_cost_plane_from_synthetic_steps():
    model = StepCostModel(prior_weight=0.0)
    synthetic_steps(model)
    assert model.num_steps == 16
    assert model.coefs.base == pytest.approx(0.010, rel=1e-6)
    assert model.coefs.per_row == pytest.approx(0.002, rel=1e-6)
    assert model.coefs.per_token == pytest.approx(0.0005, rel=1e-6)
    assert model.predict(10, 100) == pytest.approx(0.010 + 0.020 + 0.050, rel=1e-6)


def test_the_window_forgets_old_steps_so_the_fit_follows_a_changed_machine():
    model = StepCostModel(prior_weight=0.0, window=16)
    synthetic_steps(model, Coefs(0.5, 0.5, 0.5))
    synthetic_steps(model)                             # 16 new steps push all 16 old ones out
    assert model.coefs.per_token == pytest.approx(0.0005, rel=1e-6)


def test_prior_speaks_until_steps_say_otherwise():
    model = StepCostModel()
    assert model.coefs == Coefs(0.0, 0.0, PRIOR_TOKEN_S)        # no steps: the prior alone
    for rows in (1, 2, 4, 8) * 4:                              # decode-only steps
        model.observe(rows, 0, TRUE.seconds(rows, 0))
    c = model.coefs
    assert c.per_token == pytest.approx(PRIOR_TOKEN_S)          # tokens never ran: still the prior
    assert c.base == pytest.approx(0.010, rel=0.05) and c.per_row == pytest.approx(0.002, rel=0.05)
    synthetic_steps(model)
    assert model.coefs.per_token == pytest.approx(0.0005, rel=0.01)   # chunks ran: the data wins


def test_chunk_fills_the_tpot_budget_left_by_the_decode_rows():
    model = StepCostModel(prior_weight=0.0)
    synthetic_steps(model)
    # budget 0.9 x 50 ms = 45 ms; 8 rows cost 10 + 16 = 26 ms; 19 ms left at 0.5 ms a token: 38 tokens
    assert BUDGET_SHARE == 0.9
    assert model.chunk_tokens(8, 0.050, limit=4096) == 38
    assert model.predict(8, 38) <= BUDGET_SHARE * 0.050 < model.predict(8, 39)
    assert model.chunk_tokens(8, 0.050, limit=16) == 16            # never beyond max_prefill_tokens
    assert model.chunk_tokens(20, 0.050, limit=4096) == 0          # the rows alone fill it
    # the rate it reports: 38 tokens per 45 ms step
    assert model.prefill_rate(8, 0.050, 4096) == pytest.approx(38 / model.predict(8, 38))
    assert model.prefill_rate(20, 0.050, 4096) == 0.0
    assert model.prefill_rate(8, None, 512) == pytest.approx(512 / model.predict(8, 512))   # no target


def test_prefill_rate_is_tokens_over_forward_seconds_of_recent_batches():
    rate = RateWindow(window=2)
    assert rate.rate is None
    for tokens, seconds in ((100, 10.0), (300, 0.2), (100, 0.2)):
        rate.observe(tokens, seconds)
    assert rate.rate == pytest.approx(400 / 0.4)


# ---- the router's decision -------------------------------------------------------------------
def directory(prefill: WorkerGauges, *decode: WorkerGauges) -> WorkerDirectory:
    d = WorkerDirectory("round_robin")
    workers = [("prefill-0", "prefill", prefill)] + [(f"decode-{i}", "decode", g) for i, g in enumerate(decode)]
    for wid, role, gauges in workers:
        d.add(WorkerInfo(wid, role, "m", {"num_pages": 64, "page_size": 16}, {}, "", 0, gauges=gauges))
    return d


def place(d: WorkerDirectory, num_tokens: int, ttft=1.0) -> Placement:
    st = RequestState(rid="r", model="m", route="pd", input_ids=list(range(num_tokens)),
                      sampling=SamplingParams(), sink=lambda e: None)
    assert Placer(d, local_prefill_max_tokens=0, ttft=ttft).place(st)
    return st.placement


def test_router_prefills_on_decode_when_prefill_queueing_would_break_ttft():
    busy = WorkerGauges(num_queue_tokens=1900, prefill_throughput=1000.0)   # 1.9 s + 0.1 s > 1 s
    idle = WorkerGauges(num_queue_tokens=0, decode_side_prefill_rate=500.0, token_usage=0.2)
    d = directory(busy, WorkerGauges(decode_side_prefill_rate=0.0), idle)
    assert place(d, 100) == Placement.single("local", "decode-1")          # 0.2 s there, no headroom on decode-0
    assert d.get("decode-1").num_dispatched_tokens == 100
    quiet = WorkerGauges(num_queue_tokens=0, prefill_throughput=1000.0)
    assert place(directory(quiet, idle), 100).is_pair                     # 0.1 s: within the target
    assert place(directory(busy, idle), 100, ttft=None).is_pair            # no target: never
    full = WorkerGauges(decode_side_prefill_rate=500.0, token_usage=0.95)
    assert place(directory(busy, full), 100).is_pair                       # no pages to spare


def test_router_counts_tokens_placed_since_the_last_heartbeat():
    prefill = WorkerGauges(num_queue_tokens=0, prefill_throughput=1000.0)
    decode = WorkerGauges(decode_side_prefill_rate=400.0, token_usage=0.0)
    d = directory(prefill, decode)
    routes = [place(d, 300).route for _ in range(6)]
    # prefill: 0.3, 0.6, 0.9 s fit the target; the 4th would wait 1.2 s, decode 0.75 s: decode;
    # the 5th: prefill 1.2 s vs decode 1.5 s: prefill again; the 6th: 1.5 s either way stays a pair
    assert routes == ["pd", "pd", "pd", "local", "pd", "pd"]
    assert prefill_seconds(d.get("prefill-0"), 0) == pytest.approx(1.5)
    assert decode_side_seconds(d.get("decode-0"), 0) == pytest.approx(0.75)


def test_router_probes_a_decode_worker_that_never_prefilled_once_per_heartbeat():
    busy = WorkerGauges(num_queue_tokens=1900, prefill_throughput=1000.0)      # 2 s: breaks the 1 s target
    untried = WorkerGauges(decode_side_prefill_rate=40.0, decode_side_prefill_tokens_total=0)   # 2.5 s
    d = directory(busy, untried)
    assert place(d, 100) == Placement.single("local", "decode-0")             # the probe
    assert place(d, 100).is_pair                                               # one until the next heartbeat
    d.get("decode-0").num_dispatched_tokens = 0                                # a heartbeat, nothing measured yet
    assert place(d, 100) == Placement.single("local", "decode-0")
    measured = WorkerGauges(decode_side_prefill_rate=40.0, decode_side_prefill_tokens_total=100)
    assert place(directory(busy, measured), 100).is_pair                      # measured slow: no detour


def test_router_moves_prompts_to_decode_when_no_prefill_worker_is_left():
    d = directory(WorkerGauges(), WorkerGauges(decode_side_prefill_rate=400.0))
    d.remove("prefill-0")
    assert place(d, 50) == Placement.single("local", "decode-0")
    assert math.isinf(decode_side_seconds(directory(WorkerGauges(), WorkerGauges()).get("decode-0"), 1))


def test_a_decode_worker_not_yet_measured_serves_when_no_prefill_worker_is_alive():
    # /health calls a decode worker alone "degraded" under an [slo]: a worker that has run no forward
    # yet (rate 0) must take the prompt rather than the request being refused
    fresh, full = WorkerGauges(decode_side_prefill_rate=0.0), WorkerGauges(token_usage=0.95)
    d = directory(WorkerGauges(), full, fresh)
    d.remove("prefill-0")
    assert place(d, 50) == Placement.single("local", "decode-1")
    only_full = directory(WorkerGauges(), full)
    only_full.remove("prefill-0")
    st = RequestState(rid="r", model="m", route="pd", input_ids=list(range(50)), sampling=SamplingParams(),
                      sink=lambda e: None)
    assert not Placer(only_full, local_prefill_max_tokens=0, ttft=1.0).place(st)   # no pages to spare: 503
