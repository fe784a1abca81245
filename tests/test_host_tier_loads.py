"""The host tier's copies and loads, without a model: eviction writes every plane and layer of a page
to the host, a hit loads it back into fresh device pages when the cost model says so, loads wait for
the forward they were sealed for, go layer by layer when long, and stay out of the way of aborts,
evictions and decode imports (tests/host_tier_harness.py: the pool and the made-up KV values)."""
from __future__ import annotations

import pytest
import torch

from cluster.engine.host_tier import HostTier
from cluster.engine.load_cost import LoadCost
from cluster.engine.kv_cache import KVPool
from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.schedule_batch import Req
from cluster.sampling_params import SamplingParams
from tests.host_tier_harness import NUM_PAGES, PAGE, before_forward, check, check_shared_pages, compute, manager


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


@pytest.mark.parametrize("planes,dtype", [(1, torch.float32), (2, torch.float32), (2, torch.bfloat16)])
def test_host_tier_copies_every_plane_and_layer_of_a_page(planes, dtype):
    pool = KVPool(3, 2, 4, 6, PAGE, num_planes=planes, dtype=dtype)   # bfloat16: `[model] kv_dtype`
    tier = HostTier(pool, 5)
    assert tier.kv.dtype == dtype
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
