"""Requests that run at the same time share a prompt prefix: the first one's prompt pages join
the radix tree when its prefill ends, and a request sharing them waits a batch for them rather
than computing them again. Real unified worker and model; greedy output never changes."""
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import SchedulerConfig
from cluster.engine.page_allocator import PageAllocator
from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.prefill_manager import PrefillManager
from cluster.runtime.prefix_sharing import cache_prefilled
from cluster.runtime.schedule_batch import Req
from cluster.sampling_params import SamplingParams
from cluster.wire import protocol as P
from cluster.unified import UnifiedScheduler
from tests.inprocess_workers import Pair, drain, runner_for, serve
from tests.queue_control import QueueControl
from tests.test_prefix_cache import check_pages, submit_ids

SYSTEM = ("You are a helpful assistant. Answer in one short sentence, politely, and never "
          "mention that you are a language model. Keep answers factual and brief. Think twice "
          "before you answer, and prefer the simplest true statement over a long one. ")
MAX_TOKENS = 8


def unified(loaded, prefix_cache: bool, overlap: bool = True):
    s = UnifiedScheduler(SchedulerConfig(overlap=overlap), "unified-0", runner_for(loaded, 256), QueueControl())
    if prefix_cache:
        s.enable_prefix_cache()
    return s


def steps(s, last, n):
    for _ in range(n):
        last = s.overlap_step(last)
    return last


def test_a_request_arriving_during_anothers_decode_extends_from_its_prompt_pages(loaded):
    ids = loaded.tokenizer.encode(SYSTEM + "What is the capital of France?")
    ref = serve(unified(loaded, prefix_cache=False), [ids], "r")["r0"]
    s = unified(loaded, prefix_cache=True)
    ctl = s.control
    ctl.generate("a", ids, max_tokens=MAX_TOKENS, ignore_eos=True)
    last = steps(s, None, 3)                     # a prefilled and processed, decoding
    assert s.cache.tree.num_cached_pages == len(ids) // 16           # before a finished
    assert s.cache.tree.num_evictable_pages == 0                      # a references them
    ctl.generate("b", ids, max_tokens=MAX_TOKENS, ignore_eos=True)
    drain([s], [last], lambda: len(ctl.finished()) == 2)
    assert ctl.outputs() == {"a": ref, "b": ref} and ctl.errors() == []
    assert s.cache.num_hit_tokens == (len(ids) - 1) // 16 * 16      # b: every whole page but the last position's
    check_pages(s)


def test_two_requests_with_one_prompt_at_once_compute_it_once(loaded, caplog):
    """Both arrive together: the second waits while the first's prefill runs, then hits its pages."""
    ids = loaded.tokenizer.encode(SYSTEM + "Name a large ocean.")
    ref = serve(unified(loaded, prefix_cache=False), [ids], "r")["r0"]
    s = unified(loaded, prefix_cache=True)
    ctl = s.control
    for rid in ("a", "b"):
        ctl.generate(rid, ids, max_tokens=MAX_TOKENS, ignore_eos=True)
    forwards = []
    forward = s.executor.forward_fn
    s.executor.forward_fn = lambda fi: (forwards.append((fi.is_decode, sum(fi.extend_lens))), forward(fi))[1]
    drain([s], [None], lambda: len(ctl.finished()) == 2)
    assert ctl.outputs() == {"a": ref, "b": ref} and ctl.errors() == []
    hit = (len(ids) - 1) // 16 * 16
    assert s.cache.num_hit_tokens == hit and s.prefill.sharing.num_held_total >= 1
    assert sum(n for is_decode, n in forwards if not is_decode) == len(ids) + len(ids) - hit   # prompt tokens computed
    check_pages(s)


def test_aborting_the_first_while_the_second_runs_on_its_pages_keeps_the_second_correct(loaded):
    ids = loaded.tokenizer.encode(SYSTEM + "How many legs has a cat?")
    ref = serve(unified(loaded, prefix_cache=False), [ids], "r", max_tokens=12)["r0"]
    s = unified(loaded, prefix_cache=True)
    ctl = s.control
    ctl.generate("a", ids, max_tokens=64, ignore_eos=True)
    ctl.generate("b", ids, max_tokens=12, ignore_eos=True)
    last = None
    for _ in range(10):                          # until b extends from a's pages
        if s.cache.num_hit_tokens:
            break
        last = steps(s, last, 1)
    last = steps(s, last, 2)
    ctl.inbound.put(P.Abort(rid="a", reason="client went away"))
    last = steps(s, last, 1)
    assert "a" not in s.reqs
    tree = s.cache.tree
    b = s.reqs["b"]
    shared = b.num_shared_pages
    assert shared in ((len(ids) - 1) // 16, len(ids) // 16) and s.cache.num_hit_tokens == (len(ids) - 1) // 16 * 16
    tree.evict(tree.num_evictable_pages)         # nothing b reads may go
    assert tree.match_prefix(ids)[0][:shared] == b.page_table[:shared]
    drain([s], [last], lambda: "b" in ctl.finished())
    assert ctl.outputs()["b"] == ref and ctl.errors() == []
    check_pages(s)


def test_a_prefill_worker_given_one_prompt_twice_at_once_computes_it_once(loaded):
    """Disaggregated: the second waits while the first's prefill runs (the worker has nothing
    else to launch, but that forward is running), then extends from its pages."""
    ids = loaded.tokenizer.encode(SYSTEM + "Name a large ocean.")
    ref = serve(unified(loaded, prefix_cache=False), [ids], "r")["r0"]
    pair = Pair(loaded)
    pair.prefill.enable_prefix_cache()
    try:
        for rid in ("a", "b"):
            submit_ids(pair, rid, ids)
        assert pair.run(2) == {"a": ref, "b": ref}
        assert pair.prefill.cache.num_hit_tokens == (len(ids) - 1) // 16 * 16
        assert pair.dc.errors() == [] and pair.pc.errors() == []
        check_pages(pair.prefill)
    finally:
        pair.close()


def test_without_overlap_sharing_keeps_greedy_output(loaded):
    tok = loaded.tokenizer
    prompts = [tok.encode(SYSTEM + q) for q in ("Say hi.", "Say bye.", "Say hi.")]
    ref = serve(unified(loaded, prefix_cache=False, overlap=False), prompts, "r")
    s = unified(loaded, prefix_cache=True, overlap=False)
    assert serve(s, prompts, "r") == ref
    assert s.cache.num_hit_tokens >= 2 * (len(tok.encode(SYSTEM)) // 16 * 16)
    check_pages(s)


# ---- the batch builder's holds, and the tree under random traffic (no model) -------------------
def sharing_manager(num_pages=64):
    cache = CacheManager(PageAllocator(num_pages), page_size=16)
    cache.enable_prefix_cache()
    return cache, PrefillManager(cache, max_prefill_tokens=4096, max_running_requests=8)


def prompt_req(rid, ids):
    return Req(rid, list(ids), SamplingParams(max_tokens=4))


def test_a_request_sharing_pages_chosen_for_this_batch_waits_one_batch_then_hits_them():
    cache, pm = sharing_manager()
    a, b, c = prompt_req("a", range(64)), prompt_req("b", range(64)), prompt_req("c", range(100, 164))
    for r in (a, b, c):
        pm.add(r)
    first = pm.schedule(num_running=0)
    assert first.reqs == [a, c] and list(pm.waiting) == [b] and b.kv_len == 0 and not b.page_table
    cache_prefilled(cache, first)               # its forward returned
    assert a.num_shared_pages == 4 and cache.tree.num_evictable_pages == 0
    second = pm.schedule(num_running=2)
    assert second.reqs == [b] and second.prefix_lens == [48] and second.extend_lens == [16]


def test_a_held_request_waits_only_while_its_sharers_forward_runs():
    cache, pm = sharing_manager()
    a, b = prompt_req("a", range(64)), prompt_req("b", range(64))
    pm.add(a), pm.add(b)
    assert pm.schedule(num_running=0).reqs == [a]
    assert pm.schedule(num_running=1) is None   # a's prefill in flight: a decode step runs instead
    assert pm.schedule(num_running=1).reqs == [b]   # the next batch it goes, hit or not (a never came back)
    a2, b2 = prompt_req("a2", range(64)), prompt_req("b2", range(64))
    _, pm = sharing_manager()
    pm.add(a2), pm.add(b2)
    assert pm.schedule(num_running=0).reqs == [a2]
    assert pm.schedule(num_running=0) is None   # nothing else to launch: the loop processes a2's forward
    assert pm.schedule(num_running=0).reqs == [b2]  # never held twice in a row on nothing


def test_each_processed_chunk_of_a_chunked_prefill_is_shared_before_the_prompt_ends():
    cache = CacheManager(PageAllocator(64), page_size=16)
    cache.enable_prefix_cache()
    pm = PrefillManager(cache, max_prefill_tokens=40, max_running_requests=8)
    a, b = prompt_req("a", range(96)), prompt_req("b", range(96))
    pm.add(a)
    cache_prefilled(cache, pm.schedule(num_running=0))      # positions 0..39: two whole pages
    assert a.num_shared_pages == 2
    pm.add(b)
    second = pm.schedule(num_running=0)
    assert second.reqs == [a] and second.extend_lens == [40]    # the budget ends with a's chunk
    cache_prefilled(cache, second)
    assert a.num_shared_pages == 5 and not any(second.is_last_chunk)
    third = pm.schedule(num_running=0)
    assert third.reqs == [a, b] and third.prefix_lens == [80, 80] and third.extend_lens == [16, 16]


def test_a_short_common_prefix_or_an_echo_request_is_computed_at_once():
    cache, pm = sharing_manager()
    a, b = prompt_req("a", range(64)), prompt_req("b", list(range(20)) + list(range(500, 544)))
    echo = Req("e", list(range(64)), SamplingParams(max_tokens=4, prompt_logprobs=True))   # never hits the cache
    pm.add(a), pm.add(b), pm.add(echo)
    assert pm.schedule(num_running=0).reqs == [a, b, echo]


# a few shared prompts, so that requests start on one prefix before the first one's prefill ends
seqs = st.one_of(st.sampled_from([[0, 1, 0, 1, 0, 1, 1], [0, 1, 0, 1, 1, 0, 0, 1]]),
                 st.lists(st.integers(0, 1), min_size=1, max_size=9))
ops = st.one_of(
    st.tuples(st.just("start"), seqs),                  # matched, grown, its prefill launched
    st.tuples(st.sampled_from(["prefilled", "decode", "finish", "abort"]), st.integers(0, 7)),
    st.tuples(st.just("evict"), st.integers(0, 6)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=40))
def test_prompt_pages_cached_at_prefill_end_are_never_evicted_or_freed_under_their_requests(program):
    alloc = PageAllocator(14)
    cache = CacheManager(alloc, page_size=2)
    cache.enable_prefix_cache()
    tree, live = cache.tree, []
    for n, (op, arg) in enumerate(program):
        if op == "start":
            req = prompt_req(f"q{n}", arg)
            cache.match_prefix(req)
            if not cache.can_grow(req, req.seq_len):
                cache.unmatch(req)
                continue
            cache.grow(req, req.seq_len)
            req.kv_len = req.seq_len
            live.append(req)
        elif op == "evict":
            tree.evict(arg)
        elif live:
            req = live[arg % len(live)]
            if op == "prefilled":
                cache.cache_prefix(req, req.kv_len)
            elif op == "decode":
                req.output_ids.append(arg % 2)          # the token the last forward sampled
                if not cache.can_grow(req, req.kv_len + 1):
                    continue
                cache.grow(req, req.kv_len + 1)
                req.kv_len += 1
            else:
                cache.release(req, keep_kv=op == "finish")
                live.remove(req)
        tree.check_integrity()
        alloc.check_integrity(held=[tree.pages()] + [r.page_table[r.num_shared_pages:] for r in live])
        for r in live:                                  # its tree pages stay, referenced
            shared = r.page_table[:r.num_shared_pages]
            assert tree.match_prefix(r.all_ids[:len(shared) * 2])[0] == shared
            assert r.cache_node is None or r.cache_node.depth == r.num_shared_pages
            assert all(p not in set(tree.pages()) for p in r.page_table[r.num_shared_pages:])
