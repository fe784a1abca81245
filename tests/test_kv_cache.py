"""PageAllocator and KVPool: integrity under random traffic, exact export/import round trips."""
from __future__ import annotations

import random

import pytest
import torch

from cluster.engine.kv_cache import KVPool, PageAllocator


def test_allocate_free_counts_and_errors():
    alloc = PageAllocator(8)
    assert alloc.can_allocate(8) and not alloc.can_allocate(9)
    a = alloc.allocate(3)
    assert a == [0, 1, 2] and alloc.num_free_pages == 5
    with pytest.raises(MemoryError):
        alloc.allocate(6)
    alloc.free(a[:1])
    with pytest.raises(ValueError, match="double free"):
        alloc.free(a[:1])
    with pytest.raises(ValueError):
        alloc.free([8])
    alloc.check_integrity(held=[a[1:]])
    with pytest.raises(AssertionError, match="leak"):
        alloc.check_integrity(held=[a[2:]])
    with pytest.raises(AssertionError, match="two owners"):
        alloc.check_integrity(held=[a[1:], a[1:2]])


def test_10000_random_allocate_free_export_import_ops_keep_integrity():
    rng = random.Random(1234)
    page_size, layers, heads, dim = 4, 2, 2, 3
    pool = KVPool(layers, heads, dim, num_pages=64, page_size=page_size)
    alloc = PageAllocator(64)
    live: dict[int, tuple[list[int], torch.Tensor]] = {}   # request -> (pages, its KV)
    next_id = 0
    for step in range(10_000):
        op = rng.random()
        if op < 0.35:   # a new request: allocate, import its KV
            length = rng.randint(1, 24)
            need = -(-length // page_size)
            if alloc.can_allocate(need):
                pages = alloc.allocate(need)
                kv = torch.randn(layers, 2, length, heads, dim)
                pool.import_kv(pages, kv)
                live[next_id] = (pages, kv)
                next_id += 1
            else:
                with pytest.raises(MemoryError):
                    alloc.allocate(need)
        elif op < 0.7 and live:   # finish a request: its KV must be intact, then free
            rid = rng.choice(list(live))
            pages, kv = live.pop(rid)
            assert torch.equal(pool.export_kv(pages, kv.shape[2]), kv), f"step {step}: KV corrupted"
            alloc.free(pages)
        elif live:   # hand off: export and import into fresh pages, free the old ones
            rid = rng.choice(list(live))
            pages, kv = live[rid]
            need = len(pages)
            if alloc.can_allocate(need):
                new_pages = alloc.allocate(need)
                rng.shuffle(new_pages)
                pool.import_kv(new_pages, pool.export_kv(pages, kv.shape[2]))
                alloc.free(pages)
                live[rid] = (new_pages, kv)
        if step % 50 == 0:
            alloc.check_integrity(held=[p for p, _ in live.values()])
    for pages, kv in live.values():
        assert torch.equal(pool.export_kv(pages, kv.shape[2]), kv)
        alloc.free(pages)
    alloc.check_integrity(held=[])
    assert alloc.num_free_pages == 64


def test_export_shape_and_import_validation():
    pool = KVPool(3, 2, 4, num_pages=8, page_size=2)
    kv = torch.randn(3, 2, 5, 2, 4)
    pool.import_kv([5, 1, 7], kv)
    out = pool.export_kv([5, 1, 7], 5)
    assert out.shape == (3, 2, 5, 2, 4) and out.is_contiguous() and torch.equal(out, kv)
    with pytest.raises(ValueError):
        pool.import_kv([0, 1, 2], torch.randn(3, 2, 5, 3, 4))
    with pytest.raises(ValueError):
        pool.export_kv([0], 5)
