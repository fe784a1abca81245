"""The scheduler's managers: token budget, chunking, page growth, retraction, future tokens."""
import pytest

from cluster.runtime.batch_builder import build_forward_input
from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.decode_manager import DecodeManager
from cluster.engine.page_allocator import PageAllocator
from cluster.engine.stop_checker import check_finish
from cluster.runtime.prefill_manager import PrefillManager
from cluster.sampling_params import SamplingParams
from cluster.runtime.schedule_batch import ForwardMode, Req


def make_req(rid, n, **kw):
    r = Req(rid, list(range(1, n + 1)), SamplingParams(**kw), eos_token_ids=frozenset({0}))
    r.future_slot = int(rid[1:]) if rid[1:].isdigit() else 0
    return r


def test_prefill_budget_chunks_the_request_that_does_not_fit():
    cache = CacheManager(PageAllocator(64), page_size=4)
    pm = PrefillManager(cache, max_prefill_tokens=10, max_running_requests=8)
    a, b = make_req("r1", 6), make_req("r2", 9)
    pm.add(a), pm.add(b)
    batch = pm.schedule(num_running=0)
    assert batch.extend_lens == [6, 4] and batch.prefix_lens == [0, 0] and batch.is_last_chunk == [True, False]
    assert len(a.page_table) == 2 and len(b.page_table) == 1
    assert list(pm.waiting) == [b] and a.num_pending == 1
    batch2 = pm.schedule(num_running=1)
    assert batch2.reqs == [b] and batch2.prefix_lens == [4] and batch2.extend_lens == [5] and batch2.is_last_chunk == [True]
    assert b.kv_len == 9 and len(b.page_table) == 3


def test_decode_feeds_the_token_from_its_future_slot():
    cache = CacheManager(PageAllocator(64), page_size=4)
    pm = PrefillManager(cache, 64, 8)
    req = make_req("r3", 5)
    pm.add(req)
    prefill = pm.schedule(0)
    dm = DecodeManager(cache, on_retract=lambda r: None, on_fail=lambda r, why: None)
    dm.add(req)
    decode = dm.schedule()                       # launched before prefill's token is known
    fi = build_forward_input(decode)
    assert decode.mode == ForwardMode.DECODE and decode.prefix_lens == [5]
    assert fi.input_ids.tolist() == [-(3 + 1)] and fi.future_slots == [3]
    req.num_pending -= 1
    req.output_ids.append(42)                    # prefill result processed
    assert build_forward_input(prefill).input_ids.tolist() == [1, 2, 3, 4, 5]
    decode.reqs[0].num_pending -= 1
    req.output_ids.append(43)
    nxt = dm.schedule()                          # the decode forward stored 43 into slot 3: still read from there
    assert build_forward_input(nxt).input_ids.tolist() == [-(3 + 1)] and nxt.prefix_lens == [6]


def test_schedule_after_prefills_first_and_only_a_completed_prompt_joins_the_running_set():
    cache = CacheManager(PageAllocator(64), page_size=4)
    pm = PrefillManager(cache, max_prefill_tokens=10, max_running_requests=8)
    dm = DecodeManager(cache, on_retract=lambda r: None, on_fail=lambda r, why: None)
    a, b = make_req("r1", 6), make_req("r2", 9)
    pm.add(a), pm.add(b)
    first = dm.schedule_after(pm)
    assert first.mode == ForwardMode.EXTEND and first.is_last_chunk == [True, False]
    assert dm.running == [a]                     # b's prompt is not done: it does not decode yet
    a.num_pending -= 1
    a.output_ids.append(42)
    second = dm.schedule_after(pm)               # b's last chunk still goes before a's decode
    assert second.mode == ForwardMode.EXTEND and second.reqs == [b] and dm.running == [a, b]
    b.num_pending -= 1
    b.output_ids.append(43)
    third = dm.schedule_after(pm)                # nothing left to prefill: the decode step
    assert third.mode == ForwardMode.DECODE and third.reqs == [a, b]


def test_decode_retracts_newest_when_pages_run_out():
    alloc = PageAllocator(3)
    cache = CacheManager(alloc, page_size=2)
    retracted = []
    dm = DecodeManager(cache, on_retract=retracted.append, on_fail=lambda r, why: None)
    old, new = make_req("r1", 2), make_req("r2", 2)
    for r in (old, new):
        cache.grow(r, 2)
        r.kv_len = 2
        dm.add(r)
    batch = dm.schedule()        # both need a second page, only one is left
    assert retracted == [new] and batch.reqs == [old]
    assert new.page_table == [] and new.kv_len == 0
    alloc.check_integrity(held=[old.page_table])


@pytest.mark.parametrize("can_wait", [True, False])
def test_lone_request_that_cannot_grow_fails_instead_of_spinning(can_wait):
    """Its next step does not fit even the whole pool: waiting could never help."""
    cache = CacheManager(PageAllocator(1), page_size=2)
    failed = []
    dm = DecodeManager(cache, on_retract=lambda r: None, on_fail=lambda r, why: failed.append(why),
                       can_wait_alone=lambda req: can_wait)
    r = make_req("r1", 2)
    cache.grow(r, 2)
    r.kv_len = 2
    dm.add(r)
    assert dm.schedule() is None and failed and "KV cache exhausted" in failed[0]


@pytest.mark.parametrize("can_wait", [True, False])
def test_lone_request_short_of_pages_others_reserved_waits_where_it_may(can_wait):
    """Pages reserved for requests not running yet (a decode worker's KV on its way) come back:
    where the role allows it, the lone request waits for them through retraction, else it fails."""
    cache = CacheManager(PageAllocator(3), page_size=2)
    retracted, failed = [], []
    dm = DecodeManager(cache, on_retract=retracted.append, on_fail=lambda r, why: failed.append(why),
                       can_wait_alone=lambda req: can_wait)
    r, reserved = make_req("r1", 2), make_req("r2", 3)
    cache.grow(r, 2)
    cache.grow(reserved, 4)                      # not in the running set: landing KV
    r.kv_len = 2
    dm.add(r)
    assert dm.schedule() is None and r.page_table == [] and cache.can_allocate(1)
    assert (retracted, bool(failed)) == (([r], False) if can_wait else ([], True))


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i) for i in ids)


def test_finish_rules():
    tok = CharTokenizer()
    r = make_req("r1", 2, max_tokens=3)
    r.output_ids = [5]
    assert check_finish(r, tok) is None
    r.output_ids = [5, 0]
    assert check_finish(r, tok) == "stop"                       # EOS
    r = make_req("r1", 2, max_tokens=3, ignore_eos=True)
    r.output_ids = [5, 0, 0]
    assert check_finish(r, tok) == "length"
    r = make_req("r1", 2, max_tokens=9, stop=["cd"])
    r.output_ids = [1, 3]
    assert check_finish(r, tok) is None
    r.output_ids = [1, 3, 4]
    assert check_finish(r, tok) == "stop"                       # "acd" ends with "cd"
    r = make_req("r1", 2, max_tokens=9, min_tokens=2)
    r.output_ids = [0]
    assert check_finish(r, tok) is None                         # EOS before min_tokens
