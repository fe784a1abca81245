"""A request's attempt is placed on named workers: a pair's prefill and decode, or one worker
that does both; the token source is always the decode side, and the route asked for stays
what the client asked whatever the placement. The Placer picks them by the rules the
dispatcher documents (dllm, unified without a pair, local prefill, pair)."""
from __future__ import annotations

from cluster.router.placer import Placer
from cluster.router.request_state import Placement, RequestState
from cluster.router.worker_directory import WorkerDirectory, WorkerInfo
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


def _directory(*workers: tuple[str, str]):
    d = WorkerDirectory("round_robin")
    for worker_id, role in workers:
        d.add(WorkerInfo(worker_id, role, "m", {"num_pages": 64, "page_size": 16}, {}, "", 0))
    return d


def _request(ids: list[int], route: str = "pd") -> RequestState:
    return RequestState(rid="r", model="m", route=route, input_ids=ids, sampling=SamplingParams(),
                        sink=lambda e: None)


def test_placer_prefills_on_the_decode_worker_that_holds_nearly_all_of_the_prompt():
    d = _directory(("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode"))
    held = list(range(64))                               # four whole pages finished on decode-1
    d.record_finished("decode-1", held)
    st = _request(held + [7] * 8)
    assert Placer(d, local_prefill_max_tokens=8).place(st)
    assert st.placement == Placement.single("local", "decode-1")
    assert Placer(d, local_prefill_max_tokens=4).place(st)   # 8 uncached tokens > 4: a pair
    assert st.placement.is_pair and st.placement.prefill == "prefill-0"
    assert Placer(d, local_prefill_max_tokens=0).place(_request(held))   # off: a pair even when all is held
    assert not Placer(d, 0).place(_request([1], route="dllm"))           # no dllm worker: not placed


def test_placer_sends_to_unified_workers_only_without_a_pair():
    d = _directory(("unified-0", "unified"))
    st = _request([1, 2, 3])
    assert Placer(d, 0).place(st) and st.placement == Placement.single("unified", "unified-0")
    d = _directory(("unified-0", "unified"), ("prefill-0", "prefill"), ("decode-0", "decode"))
    assert Placer(d, 0).place(st) and st.placement == Placement("pd", "prefill-0", "decode-0")


def test_a_dllm_group_that_prefills_remotely_pairs_its_worker_with_a_prefill_worker():
    from cluster.config import WorkerGroup
    d = WorkerDirectory("round_robin")
    d.add(WorkerInfo("prefill-0", "prefill", "m", {"num_pages": 64, "page_size": 16}, {}, "tcp://p", 0))
    d.add(WorkerInfo("dllm-0", "dllm", "m-dllm", {"num_pages": 64, "page_size": 16}, {}, "tcp://d", 0))

    def placed(mode: str, num_tokens: int, busy: bool = False) -> Placement:
        group = WorkerGroup("dllm", model="m-dllm", prefill=mode, remote_prefill_min_tokens=100)
        d.get("dllm-0").num_inflight = int(busy)
        st = RequestState(rid="r", model="m-dllm", route="dllm", input_ids=[5] * num_tokens,
                          sampling=SamplingParams(), sink=lambda e: None)
        assert Placer(d, 0, {"m-dllm": group}).place(st)
        return st.placement

    assert placed("local", 500) == Placement.single("dllm", "dllm-0")
    assert placed("remote", 3) == Placement("dllm_remote", "prefill-0", "dllm-0")
    assert placed("auto", 99) == Placement.single("dllm", "dllm-0")        # short, and the worker idles
    assert placed("auto", 100).route == "dllm_remote"                        # long enough
    assert placed("auto", 5, busy=True).route == "dllm_remote"               # its running blocks would wait
    d.remove("prefill-0")
    assert placed("remote", 500) == Placement.single("dllm", "dllm-0")     # no prefill worker: never waits
