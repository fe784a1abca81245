"""A request's attempt is placed on named workers: a pair's prefill and decode, or one worker
that does both; the token source is always the decode side, and the route asked for stays
what the client asked whatever the placement."""
from __future__ import annotations

from cluster.router.request_state import Placement, RequestState
from cluster.sampling_params import SamplingParams


def test_a_pair_has_two_workers_and_streams_from_decode():
    p = Placement("pd", "prefill-0", "decode-1")
    assert p.is_pair and p.workers == ("prefill-0", "decode-1")
    gone = p.without_prefill()
    assert not gone.is_pair and gone.workers == ("decode-1",) and gone.decode == "decode-1"


def test_one_worker_placements_name_it_once():
    for route in ("unified", "local", "dllm"):
        p = Placement.single(route, "w-0")
        assert not p.is_pair and p.workers == ("w-0",) and p.route == route


def test_requested_route_is_kept_apart_from_the_placement():
    st = RequestState(rid="r", model="m", route="pd", input_ids=[1], sampling=SamplingParams(),
                      sink=lambda e: None)
    assert st.workers == () and st.token_source is None
    st.placement = Placement.single("local", "decode-0")
    assert st.route == "pd" and st.token_source == "decode-0" and st.workers == ("decode-0",)
