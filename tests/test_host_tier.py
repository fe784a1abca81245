"""The host tier of the prefix cache, without a model: a CacheManager over a real (tiny, CPU)
KV pool and host tier whose pages hold a value per cached prefix, under random traffic of
requests that finish, abort, are retracted and re-prefilled, and workers that die."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.engine.host_tier import HostTier
from cluster.engine.load_cost import LoadCost
from cluster.engine.kv_cache import KVPool
from cluster.engine.page_allocator import PageAllocator
from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.schedule_batch import Req
from cluster.sampling_params import SamplingParams

PAGE = 2
NUM_PAGES = 6


def manager(num_pages: int = NUM_PAGES, host_pages: int = 64, planes: int = 2) -> CacheManager:
    pool = KVPool(2, 1, 3, num_pages, PAGE, num_planes=planes)
    cm = CacheManager(PageAllocator(num_pages), PAGE)
    cm.enable_prefix_cache(HostTier(pool, host_pages))
    return cm


def before_forward(tier: HostTier) -> None:
    """What the worker does around a launch: seal the queued loads, then run them before it."""
    tier.seal(1)
    tier.launching(1)
    tier.flush()


def value(prefix: tuple) -> float:
    """The KV a page holds when the tokens up to its end are `prefix` (a made-up function)."""
    return float(hash(prefix) % 100_003)


def compute(cm: CacheManager, req: Req) -> None:
    """The request's forward: write the KV of every page it owns (not the shared ones), after
    the copies queued before it (as the worker's forward wrapper does)."""
    before_forward(cm.host_tier)
    kv = cm.host_tier.pool.kv
    for j in range(req.num_shared_pages, len(req.page_table)):
        kv[:, :, :, req.page_table[j]] = value(tuple(req.all_ids[:(j + 1) * PAGE]))
    req.kv_len = req.seq_len


def check_shared_pages(cm: CacheManager, req: Req) -> None:
    """Every page a request starts from holds its prefix's KV (loaded ones once flushed)."""
    before_forward(cm.host_tier)
    kv = cm.host_tier.pool.kv
    for j in range(req.num_shared_pages):
        assert kv[1, -1, 0, req.page_table[j], -1, -1].item() == value(tuple(req.all_ids[:(j + 1) * PAGE]))


def check(cm: CacheManager, live: list[Req]) -> None:
    tree = cm.tree
    tree.check_integrity()
    own = [r.page_table[r.num_shared_pages:] for r in live]
    cm.allocator.check_integrity(held=[tree.pages()] + own)
    cm.host_tier.allocator.check_integrity(held=[tree.host_pages()])
    assert not cm.host_tier.loading or cm.host_tier._pending    # pins only while loads are queued
    assert cm.num_host_hit_tokens <= cm.num_hit_tokens <= cm.num_query_tokens


CONVERSATIONS = [(0, 0, 1, 1, 2, 2, 0, 1, 2), (0, 0, 1, 1, 0, 0, 2, 2, 1), (2, 1, 0, 2, 1, 0, 2, 1, 0),
                 (1, 1, 1, 1, 1, 1, 1, 1, 1)]
seqs = st.one_of(st.lists(st.integers(0, 1), min_size=3, max_size=9).map(tuple),   # turns of a few
                 st.tuples(st.sampled_from(CONVERSATIONS), st.integers(3, 9)).map(lambda c: c[0][:c[1]]))
request = st.tuples(st.just("request"), seqs, st.sampled_from([False, False, True]))  # keep it live?
ops = st.one_of(
    request, request, request,
    st.tuples(st.just("finish"), st.integers(0, 7)),
    st.tuples(st.just("abort"), st.integers(0, 7)),
    st.tuples(st.just("retract"), st.integers(0, 7)),      # pages back (kept), prefilled again
    st.tuples(st.just("death"),),                          # the peer died: every live request aborted
    st.tuples(st.just("evict_host"), st.integers(0, 5)),
    st.tuples(st.just("recompute_is_cheaper"), st.booleans()).filter(lambda op: not op[1]),
    st.tuples(st.just("recompute_is_cheaper"), st.booleans()),
)


def run_program(program, host_pages: int, exact: bool) -> None:
    cm, model, live, n = manager(host_pages=host_pages), set(), [], 0

    def request(ids: tuple, keep_live: bool) -> None:
        nonlocal n
        n += 1
        req = Req(f"r{n}", list(ids), SamplingParams())
        pages, node = cm.tree.match_prefix(ids[:-1])
        cm.tree.lock(node)                     # as match_prefix does before it loads
        device_k, free = len(pages), cm.num_free_pages
        cm.tree.unlock(node)
        model_k = max((j for j in range(len(ids) // PAGE + 1) if (len(ids) - 1) // PAGE >= j
                       and all(ids[:i * PAGE] in model for i in range(1, j + 1))), default=0)
        loads = cm.host_tier.cost.should_load(PAGE)
        cm.match_prefix(req)
        if exact:   # a host tier that never runs out: all it was given comes back, as far as pages fit
            assert req.num_shared_pages == (min(model_k, device_k + free) if loads else device_k), \
                (req.num_shared_pages, model_k, device_k, free)
        check_shared_pages(cm, req)
        if not cm.can_grow(req, req.seq_len):
            cm.unmatch(req)
            return
        cm.grow(req, req.seq_len)
        compute(cm, req)
        if keep_live:
            live.append(req)
        else:
            finish(req)

    def finish(req: Req) -> None:
        model.update(tuple(req.all_ids[:j * PAGE]) for j in range(1, req.seq_len // PAGE + 1))
        cm.release(req, keep_kv=True)

    for op, *args in program:
        if op == "request":
            request(*args)
        elif op in ("finish", "abort", "retract") and live:
            req = live.pop(args[0] % len(live))
            if op == "abort":
                cm.release(req, keep_kv=False)
            else:
                finish(req)
            if op == "retract":
                request(tuple(req.all_ids), True)
        elif op == "death":
            while live:
                cm.release(live.pop(), keep_kv=False)
        elif op == "evict_host" and not exact:
            cm.tree.evict_host(args[0])
        elif op == "recompute_is_cheaper":
            cm.host_tier.cost.prefill_tokens_per_s = 1e30 if args[0] else None
        check(cm, live)
    while live:
        cm.release(live.pop(), keep_kv=True)
    check(cm, live)


@settings(max_examples=250, deadline=None)
@given(st.lists(ops, min_size=10, max_size=40))
def test_tiers_give_back_every_prefix_a_large_host_tier_was_given(program):
    run_program(program, host_pages=512, exact=True)


@settings(max_examples=250, deadline=None)
@given(st.lists(ops, min_size=10, max_size=40))
def test_tiers_stay_consistent_when_the_host_tier_runs_out(program):
    run_program(program, host_pages=3, exact=False)


def test_tiers_stay_consistent_under_long_seeded_random_traffic():
    """Longer programs than hypothesis tends to draw, so the host tier fills, serves hits and evicts."""
    rng = random.Random(7)
    kinds = ["request"] * 6 + ["finish", "retract", "abort", "evict_host", "death"]
    for _ in range(60):
        program = []
        for _ in range(40):
            kind = rng.choice(kinds)
            if kind == "request":
                ids = rng.choice(CONVERSATIONS)[:rng.randint(3, 9)] if rng.random() < 0.5 else \
                    tuple(rng.randint(0, 1) for _ in range(rng.randint(1, 9)))
                program.append((kind, ids, rng.random() < 0.3))
            else:
                program.append((kind,) if kind == "death" else (kind, rng.randint(0, 7)))
        run_program(program, host_pages=512, exact=True)
        run_program(program, host_pages=3, exact=False)


def test_an_evicted_prefix_comes_back_from_the_host_tier_into_fresh_device_pages():
    cm = manager(num_pages=4)
    first = Req("a", [1, 1, 2, 2, 3, 3, 9], SamplingParams())
    cm.match_prefix(first)
    cm.grow(first, first.seq_len)
    compute(cm, first)
    cm.release(first)                                     # 3 whole pages cached, 1 free
    other = Req("b", [7] * 7, SamplingParams())
    cm.match_prefix(other)
    cm.grow(other, other.seq_len)                         # evicts the first prompt's pages to the host
    assert cm.host_tier.bytes_to_host > 0 and cm.tree.num_host_pages == 3
    cm.release(other, keep_kv=False)
    again = Req("c", [1, 1, 2, 2, 3, 3, 4], SamplingParams())
    assert cm.match_prefix(again) == 6 and cm.num_host_hit_tokens == 6
    check_shared_pages(cm, again)
    assert cm.host_tier.bytes_to_device == 3 * cm.host_tier.page_bytes
    gauges = cm.tier_gauges()
    assert gauges["prefix_cache_hit_tokens_total"] == {"device": 0, "host": 6}
    cm.release(again)
    check(cm, [])


@pytest.mark.parametrize("planes", [1, 2])
def test_host_tier_copies_every_plane_and_layer_of_a_page(planes):
    pool = KVPool(3, 2, 4, 6, PAGE, num_planes=planes)
    tier = HostTier(pool, 5)
    pool.kv.copy_(torch.randn(pool.kv.shape))
    before = pool.kv[:, :, :, [1, 4]].clone()
    tier.write([1, 4], [3, 0])
    pool.kv[:, :, :, [1, 4]] = 0                 # the device pages are free once write returns
    tier.load([3, 0], [2, 5])
    assert tier.loading == {3: 1, 0: 1}
    before_forward(tier)
    assert not tier.loading
    assert (pool.kv[:, :, :, [2, 5]] == before).all()


def test_load_cost_loads_only_when_the_copy_beats_the_prefill():
    cost = LoadCost(copy_bytes_per_s=1e9, bytes_per_token=1000)    # 1 us a token
    assert cost.should_load(100)                                    # no prefill timed yet
    cost.observe_prefill(1000, 0.1)                                 # 100 us a token
    assert cost.should_load(100)
    cost.prefill_tokens_per_s = 1e7                                 # 0.1 us a token
    assert not cost.should_load(100)


def test_a_load_waits_for_the_forward_it_was_sealed_for():
    """A forward launched earlier may still write a freshly allocated page: not before it."""
    pool = KVPool(1, 1, 2, 4, PAGE)
    tier = HostTier(pool, 4)
    tier.kv[:, 2] = 7.0
    tier.load([2], [1])
    tier.seal(5)
    tier.launching(4)
    tier.flush()
    assert (pool.kv[:, :, :, 1] == 0).all() and tier.loading == {2: 1}
    tier.launching(5)
    tier.flush()
    assert (pool.kv[:, :, :, 1] == 7).all() and not tier.loading


def host_hit(cm: CacheManager) -> Req:
    """A prompt computed and cached, its two whole pages evicted to the host tier, then a request
    matching them: -> that request, its loads queued."""
    first = Req("a", [1, 1, 2, 2, 9], SamplingParams())
    cm.match_prefix(first)
    cm.grow(first, first.seq_len)
    compute(cm, first)
    cm.release(first)
    cm.tree.evict(2)                                      # both pages to the host tier
    again = Req("b", [1, 1, 2, 2, 3], SamplingParams())
    assert cm.match_prefix(again) == 4 and cm.host_tier.loading
    return again


def test_a_request_not_scheduled_after_its_host_hit_gives_the_loaded_pages_back():
    cm = manager(num_pages=4)
    again = host_hit(cm)
    cm.unmatch(again)
    assert cm.num_host_hit_tokens == cm.num_hit_tokens == 0 and not cm.host_tier.loading
    assert cm.tree.num_cached_pages == 0 and cm.tree.num_host_pages == 2
    check(cm, [])


def filled_tier(layers: int = 3) -> HostTier:
    """A tier whose host pages 0..3 hold 10 * layer + page + 1 in every value."""
    tier = HostTier(KVPool(layers, 1, 2, 6, PAGE), 4)
    value = torch.arange(layers)[:, None] * 10.0 + torch.arange(4)[None, :] + 1.0       # [layers, pages]
    tier.kv.copy_(value[:, :, None, None, None, None].expand(tier.kv.shape))
    return tier


def test_a_long_load_goes_layer_by_layer_each_layer_copied_right_before_its_layer():
    tier = filled_tier()
    tier.layerwise_min_bytes = 0                  # every load counts as long
    kv = tier.pool.kv
    tier.load([2, 3], [4, 1])
    tier.seal(1)
    tier.launching(1)
    tier.flush(layerwise=True)
    assert (kv == 0).all() and tier.loading == {2: 1, 3: 1} and tier.num_layerwise_loads == 1
    tier.before_layer(0)
    assert (kv[0, :, :, 4] == 3).all() and (kv[0, :, :, 1] == 4).all() and (kv[1:] == 0).all()
    tier.before_layer(1)
    assert (kv[1, :, :, 4] == 13).all() and (kv[2] == 0).all()
    tier.end_forward()                            # the forward failed before layer 2: its pages are completed
    assert (kv[2, :, :, 4] == 23).all() and (kv[2, :, :, 1] == 24).all() and not tier.loading


def test_a_short_load_or_a_decode_forward_loads_every_layer_before_the_forward():
    tier = filled_tier()
    tier.load([0], [2])
    tier.seal(1)
    tier.launching(1)
    tier.flush(layerwise=True)                    # 1 page: under layerwise_min_bytes
    assert [tier.pool.kv[layer, 0, 0, 2, 0, 0].item() for layer in range(3)] == [1, 11, 21]
    assert tier.num_layerwise_loads == 0 and not tier.loading


def aborted_host_hit(cm: CacheManager) -> list[int]:
    """A request hits two host pages (their loads queued and sealed for forward 1) and is aborted
    before that forward runs; -> the device pages its loads target."""
    again = host_hit(cm)
    cm.seal_loads(1)
    targets = again.page_table[:2]
    cm.release(again, keep_kv=False)              # the abort: the loaded nodes are unreferenced now
    return targets


def test_an_aborted_host_hit_whose_load_has_not_run_never_overwrites_a_decode_import():
    cm = manager(num_pages=4)
    tier = cm.host_tier
    targets = aborted_host_hit(cm)
    imported = cm.tree.allocate(4)                # a decode import takes every page: the targets are evicted
    assert set(targets) <= set(imported) and not tier.loading
    tier.pool.kv[:, :, :, imported] = -5.0        # the imported KV lands
    tier.launching(1)
    tier.flush()                                  # forward 1 starts: its cancelled loads must not run
    assert (tier.pool.kv[:, :, :, imported] == -5.0).all()
    assert tier.bytes_to_device == 0
    cm.allocator.free(imported)
    check(cm, [])


def test_a_layer_by_layer_load_stops_at_a_page_evicted_during_its_forward():
    cm = manager(num_pages=4)
    tier = cm.host_tier
    tier.layerwise_min_bytes = 0
    targets = aborted_host_hit(cm)
    tier.launching(1)
    tier.flush(layerwise=True)
    tier.before_layer(0)                          # forward 1 runs layer 0 with the loads in flight
    imported = cm.tree.allocate(4)
    tier.pool.kv[:, :, :, imported] = -5.0
    tier.before_layer(1)
    tier.end_forward()
    assert set(targets) <= set(imported) and (tier.pool.kv[:, :, :, imported] == -5.0).all()
    assert not tier.loading
    cm.allocator.free(imported)
    check(cm, [])


def test_pages_in_reverse_host_order_copy_as_one_run_each_way():
    """A prefix evicted leaf first holds its host pages in reverse: still one block per layer."""
    tier = HostTier(KVPool(2, 1, 2, 6, PAGE), 5)
    kv = tier.pool.kv
    kv.copy_(torch.randn(kv.shape))
    before = kv[:, :, :, [0, 1, 2]].clone()
    tier.write([0, 1, 2], [4, 3, 2])
    assert torch.equal(tier.kv[:, [4, 3, 2]], before.permute(0, 3, 1, 2, 4, 5))
    tier.load([4, 3, 2], [5, 4, 3])
    assert tier._plan([4, 3, 2], [5, 4, 3])[0] == [(0, 2, 3)]
    before_forward(tier)
    assert torch.equal(kv[:, :, :, [5, 4, 3]], before)


def test_a_host_page_given_twice_in_one_write_back_holds_the_last_device_page():
    tier = HostTier(KVPool(2, 1, 2, 6, PAGE), 5)
    kv = tier.pool.kv
    kv.copy_(torch.randn(kv.shape))
    tier.write([4, 1, 3], [2, 0, 2])            # host page 2 given, taken back and given again
    assert torch.equal(tier.kv[:, 2], kv[:, :, :, 3]) and torch.equal(tier.kv[:, 0], kv[:, :, :, 1])


def test_other_tp_ranks_follow_rank_0s_write_backs_and_loads_on_their_own_heads():
    """Each rank's tier holds its own heads: rank 0's write-backs and loads, sent in order with the
    forwards, do the same on another rank's pool (tp_follower.follow_tier), so both pools get their
    own heads of an evicted prefix back."""
    from types import SimpleNamespace

    from cluster.runtime.tp_follower import follow_tier
    pools = [KVPool(2, 1, 3, NUM_PAGES, PAGE) for _ in range(2)]     # rank r holds KV head r
    for r, p in enumerate(pools):
        p.kv.copy_(torch.arange(p.kv.numel(), dtype=torch.float32).view_as(p.kv) * (r + 1))
    want = [p.kv.clone() for p in pools]
    rank1 = SimpleNamespace(kv_pool=pools[1], tier=None)
    tier = HostTier(pools[0], 16)
    tier.mirror = lambda op, n, host, dev: setattr(rank1, "tier", follow_tier(
        rank1, rank1.tier, {"op": op, "num_pages": n, "host": host, "dev": dev}))
    tier.write([4, 1], [7, 3])                  # evicted: device pages 4 and 1 to host pages 7 and 3
    for p in pools:
        p.kv[:, :, :, [1, 2, 4, 5]] = -1.0      # the device pages take other KV
    tier.load([3, 7], [2, 5])                   # a host hit: back into device pages 2 and 5
    assert (pools[1].kv[:, :, :, [2, 5]] == -1.0).all()   # not before the forward it precedes
    before_forward(tier)                        # rank 0 runs it, and sends it ahead of the forward
    for r, p in enumerate(pools):
        assert torch.equal(p.kv[:, :, :, [2, 5]], want[r][:, :, :, [1, 4]]), r
    assert rank1.tier.num_pages == tier.num_pages and rank1.tier.bytes_to_device == tier.bytes_to_device
