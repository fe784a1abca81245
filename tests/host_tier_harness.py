"""A CacheManager over a real (tiny, CPU) KV pool and host tier whose pages hold a value per cached
prefix (no model): the set-up and checks of the host tier tests (test_host_tier*.py)."""
from __future__ import annotations

from cluster.engine.host_tier import HostTier
from cluster.engine.kv_cache import KVPool
from cluster.engine.page_allocator import PageAllocator
from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.schedule_batch import Req

PAGE = 2
NUM_PAGES = 6


def manager(num_pages: int = NUM_PAGES, host_pages: int = 64, planes: int = 2, adaptive: bool = True) -> CacheManager:
    """`adaptive=False`: the tier writes every evicted page (tests that expect all of them back)."""
    pool = KVPool(2, 1, 3, num_pages, PAGE, num_planes=planes)
    cm = CacheManager(PageAllocator(num_pages), PAGE)
    cm.enable_prefix_cache(HostTier(pool, host_pages))
    cm.host_tier.policy.adaptive = adaptive
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
